"""Convert between checkpoint formats, one tensor at a time: `native` ⇄ `meta` ⇄ `hf`.

A reader knows the model config and hands out one logical tensor (native name, Meta's
convention, unpadded) at a time; a writer streams them out. Only Meta's `.pth` output holds
more: torch.save writes one shard file from a dict, so one tensor-parallel shard (1/tp of the
model) is in memory at once. Every tensor is checked against the shape the config implies.
"""
from __future__ import annotations

import json
import pickle
import re
import resource
from dataclasses import asdict
from pathlib import Path

import torch

from llama import formats
from llama.config import LlamaConfig
from llama.inputs import read_json
from parallel.checkpoint import (
    FORMAT,
    LOGICAL_FILES_VERSION,
    CheckpointError,
    read_meta,
    resolve_checkpoint,
    stage_files,
)
from parallel.checkpoint_pieces import PieceIndex
from parallel.tensor_files import StreamingSafetensorsWriter, TensorFile, TensorFileError

FORMATS = ("native", "meta", "hf")
CHECKPOINT_ERRORS = (CheckpointError, TensorFileError)  # a missing, truncated or foreign file: bad input


class ConversionError(ValueError):
    pass


def _check(name: str, tensor: torch.Tensor, shape: tuple, source: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config says {tuple(shape)}")
    return tensor


class NativeReader:
    def __init__(self, path):
        self.meta = read_meta(path)
        directory = resolve_checkpoint(path)
        self.cfg = LlamaConfig(**self.meta["config"]["model"])
        if self.meta["version"] >= 3:  # pieces written by every rank: assembled per tensor
            self.index = PieceIndex.open(directory)
        else:  # names a missing stage file; verifies checksums
            self.index = PieceIndex.of_whole_tensors(directory, stage_files(directory, self.meta, "model"))
        self.source = str(directory)

    def _has(self, name: str) -> None:
        if name not in self.index:
            raise ConversionError(f"{self.source}: no tensor {name!r}")

    def dtype(self, name: str) -> torch.dtype:
        self._has(name)
        return self.index.dtype(name)

    def tensor(self, name: str, shape) -> torch.Tensor:
        self._has(name)
        return _check(name, self.index.logical(name), shape, self.source)


class PickledTensors:
    """A PyTorch pickle of tensors (Meta's `consolidated.NN.pth`, Hugging Face's
    `pytorch_model*.bin`), read as TensorFile is: `names`, `dtype()`, `get()`.
    Loaded with `weights_only=True` (memory-mapped where the file's format allows): a pickle
    that would need code to load is refused, never run."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # the legacy (pre-zip) format cannot be memory-mapped
                if "mmap" not in str(err):
                    raise
                self.state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConversionError(f"{path}: no such file") from None
        except pickle.UnpicklingError as err:
            needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            raise ConversionError(f"{path}: refused: its pickle needs code to load "
                                  f"({needs.group(1) if needs else 'an object that is not a tensor'}), and this "
                                  "tool never runs code from a checkpoint (torch.load weights_only=True)") from None
        except Exception as err:
            raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or corrupted?): "
                                  f"{str(err).splitlines()[0]}") from None
        if not isinstance(self.state, dict) or not all(isinstance(t, torch.Tensor) for t in self.state.values()):
            raise ConversionError(f"{path}: not a state dict of tensors")
        self.names = list(self.state)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


class MetaReader:
    def __init__(self, path, max_seq_len: int = 2048):
        path = Path(path)
        self.source = str(path)
        if not (path / "params.json").is_file():
            raise ConversionError(f"{self.source}: no params.json (not Meta's format)")
        self.shards = sorted(path.glob("consolidated.*.pth"))
        if not self.shards:
            raise ConversionError(f"{self.source}: no consolidated.NN.pth files")
        self.state = [PickledTensors(f).state for f in self.shards]  # memory-mapped: read when used
        params = read_json(path / "params.json", "Meta's params.json")
        vocab = self.state[0]["tok_embeddings.weight"].shape[0]
        self.cfg = _config(formats.config_from_meta, path / "params.json", params, vocab, max_seq_len)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[0][name].dtype

    def tensor(self, name: str, shape) -> torch.Tensor:
        parts = [s[name] for s in self.state if name in s]
        if len(parts) != len(self.shards):
            raise ConversionError(f"{self.source}: {name} is missing from some consolidated.NN.pth")
        dim = formats.meta_split_dim(name)
        full = parts[0] if dim is None else torch.cat(parts, dim=dim)
        if name in ("tok_embeddings.weight", "output.weight") and full.shape[0] > self.cfg.vocab_size:
            full = full[: self.cfg.vocab_size]  # rows padded for the shard count
        return _check(name, full, shape, self.source)


# Hugging Face's weight files, in the order transformers prefers them: (index, single file)
HF_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"),
              ("pytorch_model.bin.index.json", "pytorch_model.bin"))


def _hf_weight_files(path: Path) -> list[Path]:
    for index, single in HF_WEIGHTS:
        if (path / index).is_file():
            return [path / f for f in _weight_files(path / index)]
        if (path / single).is_file():
            return [path / single]
    names = ", ".join(n for pair in HF_WEIGHTS for n in pair)
    raise ConversionError(f"{path}: no weights: none of {names}")


def hf_model_config(path) -> LlamaConfig:
    """The model config of a Hugging Face directory, from its config.json alone."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path}: no config.json (not a Hugging Face model)")
    return _config(formats.config_from_hf, path / "config.json", read_json(path / "config.json", "Hugging Face config"))


class HFReader:
    def __init__(self, path):
        path = Path(path)
        self.source = str(path)
        self.cfg = hf_model_config(path)
        self.files = {}
        for f in _hf_weight_files(path):
            tf = TensorFile(f) if f.suffix == ".safetensors" else PickledTensors(f)
            self.files.update({n: tf for n in tf.names})

    def dtype(self, name: str) -> torch.dtype:
        hf = formats.to_hf_name(name)
        if hf not in self.files:
            raise ConversionError(f"{self.source}: no tensor {hf!r}")
        return self.files[hf].dtype(hf)

    def tensor(self, name: str, shape) -> torch.Tensor:
        hf = formats.to_hf_name(name)
        if hf not in self.files:
            raise ConversionError(f"{self.source}: no tensor {hf!r}")
        t = self.files[hf].get(hf)
        if formats.is_rotary(name):
            t = formats.permute_from_hf(t, self.cfg.head_dim)
        if name in ("tok_embeddings.weight", "output.weight") and t.shape[0] > self.cfg.vocab_size:
            t = t[: self.cfg.vocab_size]
        return _check(name, t, shape, self.source)


def _config(parse, path: Path, values, *args) -> LlamaConfig:
    """parse(values, *args), its errors naming the file the values came from."""
    try:
        return parse(values, *args)
    except KeyError as err:
        raise ConversionError(f"{path}: no {err} key") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise ConversionError(f"{path}: {err}") from None


def _weight_files(index: Path) -> list[str]:
    values = read_json(index, "safetensors index")
    weight_map = values.get("weight_map") if isinstance(values, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: no 'weight_map' object")
    return sorted(set(weight_map.values()))


def open_reader(fmt: str, path, max_seq_len: int = 2048):
    if fmt == "native":
        return NativeReader(path)
    if fmt == "meta":
        return MetaReader(path, max_seq_len)
    if fmt == "hf":
        return HFReader(path)
    raise ConversionError(f"format {fmt!r} is not one of {FORMATS}")


def write_native(reader, out: Path) -> None:
    names = formats.native_names(reader.cfg)
    dtype = reader.dtype(names[0][0])
    out.mkdir(parents=True, exist_ok=True)
    writer = StreamingSafetensorsWriter(out / "model-pp000.safetensors.tmp", [(n, dtype, s) for n, s in names])
    for n, s in names:
        writer.write(n, reader.tensor(n, s).to(dtype))
    writer.close()
    (out / "model-pp000.safetensors.tmp").replace(out / "model-pp000.safetensors")
    meta = {"format": FORMAT, "version": LOGICAL_FILES_VERSION, "step": 0, "consumed_samples": 0, "adam_step": 0,
            "layout": {"tp": 1, "pp": 1, "dp": 1, "distributed_optimizer": False},
            "config": {"model": asdict(reader.cfg)}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


HF_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"


def write_hf(reader, out: Path, max_shard_bytes: int = HF_MAX_SHARD_BYTES, tokenizer=None) -> None:
    """config.json and the weights; with `tokenizer` (a SentencePiece model), Hugging Face's
    tokenizer files beside them (llama/hf_tokenizer.py), checked before any weight is written."""
    if tokenizer is not None:
        from llama.hf_tokenizer import check_tokenizer
        tokenizer = check_tokenizer(tokenizer, reader.cfg.vocab_size)
    names = formats.native_names(reader.cfg)
    dtype = reader.dtype(names[0][0])
    size = torch.empty((), dtype=dtype).element_size()
    groups, current, total = [], [], 0
    for n, s in names:  # files of at most max_shard_bytes, as transformers shards
        nbytes = torch.Size(s).numel() * size
        if current and total + nbytes > max_shard_bytes:
            groups.append(current)
            current, total = [], 0
        current.append((n, s))
        total += nbytes
    groups.append(current)
    out.mkdir(parents=True, exist_ok=True)
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total_size = {}, 0
    for fname, group in zip(files, groups):
        specs = [(formats.to_hf_name(n), dtype, s) for n, s in group]
        writer = StreamingSafetensorsWriter(out / (fname + ".tmp"), specs, {"format": "pt"})
        for n, s in group:
            t = reader.tensor(n, s).to(dtype)
            writer.write(formats.to_hf_name(n), formats.permute_to_hf(t, reader.cfg.head_dim)
                         if formats.is_rotary(n) else t)
            weight_map[formats.to_hf_name(n)] = fname
            total_size += t.numel() * t.element_size()
        writer.close()
        (out / (fname + ".tmp")).replace(out / fname)
    if len(groups) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}  # as transformers writes it
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = formats.hf_config(reader.cfg)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer is not None:
        from llama.hf_tokenizer import write_hf_tokenizer
        write_hf_tokenizer(tokenizer, out, reader.cfg.max_seq_len)


def write_meta(reader, out: Path, tp: int = 1) -> None:
    cfg = reader.cfg
    names = formats.native_names(cfg)
    params = formats.meta_params(cfg)  # fails before anything is written if Meta cannot express it
    out.mkdir(parents=True, exist_ok=True)
    for dim_name, value in (("dim", cfg.dim), ("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads),
                            ("ffn_dim", cfg.ffn_dim)):
        if value % tp:
            raise ConversionError(f"{dim_name}={value} is not divisible by --tp {tp}")
    padded_vocab = -(-cfg.vocab_size // tp) * tp
    if cfg.tie_word_embeddings:  # Meta's code has a head of its own: it gets the embedding (untied on reading)
        names = names + [("output.weight", (cfg.vocab_size, cfg.dim))]
    for rank in range(tp):  # one shard file in memory at a time
        shard = {}
        for n, s in names:
            t = reader.tensor("tok_embeddings.weight" if n == "output.weight" and cfg.tie_word_embeddings else n, s)
            if n in ("tok_embeddings.weight", "output.weight") and padded_vocab > cfg.vocab_size:
                t = torch.cat([t, t.new_zeros(padded_vocab - cfg.vocab_size, t.shape[1])])
            dim = formats.meta_split_dim(n)
            shard[n] = (t if dim is None else t.chunk(tp, dim)[rank]).clone()
        tmp = out / f"consolidated.{rank:02d}.pth.tmp"
        torch.save(shard, tmp)
        tmp.replace(out / f"consolidated.{rank:02d}.pth")
        del shard
    (out / "params.json").write_text(json.dumps(params))


def convert(src_fmt: str, src, dst_fmt: str, dst, tp: int = 1, max_seq_len: int = 2048,
            max_shard_bytes: int = HF_MAX_SHARD_BYTES, tokenizer=None) -> dict:
    """Convert; returns the config and the process's peak resident memory. `tokenizer`, a
    SentencePiece model, is written beside an `hf` output as Hugging Face's tokenizer files."""
    if dst_fmt not in FORMATS:
        raise ConversionError(f"format {dst_fmt!r} is not one of {FORMATS}")
    if tokenizer is not None and dst_fmt != "hf":
        raise ConversionError(f"a tokenizer is written only beside an hf output, not {dst_fmt!r}")
    reader = open_reader(src_fmt, src, max_seq_len)
    dst = Path(dst)
    if dst_fmt == "native":
        write_native(reader, dst)
    elif dst_fmt == "hf":
        write_hf(reader, dst, max_shard_bytes, tokenizer)
    else:
        write_meta(reader, dst, tp)
    largest = max(torch.Size(s).numel() for _, s in formats.native_names(reader.cfg))
    return {"config": reader.cfg, "peak_rss_bytes": peak_rss_bytes(), "largest_tensor_elements": largest}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM on Linux: unlike ru_maxrss, not inherited
    from the process that exec'ed us)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
