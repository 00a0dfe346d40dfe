"""Which rank writes which piece of a checkpoint, and how any layout reads its own slice back.

Every tensor of a checkpoint (a parameter, or a parameter's fp32 master copy or Adam moment) is
a logical tensor cut into tp shards along its `tp_dim`. A piece is a flat range of one shard's
elements (row-major): (logical name, tp rank of tp size, [start, stop)).

Who writes what, so that every rank writes about 1/world of the bytes and nothing twice:
  - a shard that several ranks hold in full (its dp replicas; every tp rank too when tp
    replicates the tensor) is split evenly among them, the i-th holder writing the i-th range;
  - under the distributed optimizer each dp rank holds only its slice of a gradient bucket: it
    writes the part of each parameter's state that its slice covers (split once more among the
    tp ranks when tp replicates that parameter).

Files: `shards/rankNNNNN.safetensors` hold one rank's pieces as 1-D tensors; `index.json` lists
every piece of every logical tensor. A reader of any layout asks for the logical rows its shard
needs and reads only the pieces that overlap them (whole old shards where the split dimension is
not the first: a row-major shard cut along a later dimension is not a flat range).

Checkpoints of format versions 1 and 2 (whole logical tensors, one file per stage and kind) read
through the same index: each tensor is one piece of a single shard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.params import logical_name
from parallel.tensor_files import StreamingSafetensorsWriter, TensorFile

INDEX = "index.json"
SHARDS = "shards"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (`parallel.checkpoint` raises it too)."""


@dataclass(frozen=True)
class Piece:
    name: str             # logical tensor: "layers.0.attention.wq.weight", "...weight.exp_avg"
    tp_rank: int
    tp_size: int          # 1 where tp replicates the tensor
    tp_dim: int | None
    shard_shape: tuple    # the shard as a rank holds it (vocabulary padding included)
    logical_shape: tuple
    start: int            # flat element range of the shard
    stop: int
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.name}@tp{self.tp_rank}/{self.start}-{self.stop}"


def file_name(rank: int) -> str:
    return f"{SHARDS}/rank{rank:05d}.safetensors"


def split(start: int, stop: int, parts: int, i: int) -> tuple[int, int]:
    """The i-th of `parts` near-equal consecutive ranges of [start, stop)."""
    n = stop - start
    return start + n * i // parts, start + n * (i + 1) // parts


def _holders(param, topo) -> tuple[int, int]:
    """(how many ranks hold this parameter's shard in full, this rank's place among them): its
    copies across tp (all tp ranks for a replicated tensor) times the dp replicas."""
    return param.tp_copies * topo.dp, topo.dp_rank * param.tp_copies + param.tp_copy_rank


def _piece(name: str, param, start: int, stop: int, dtype: torch.dtype) -> Piece:
    sharded = param.tp_dim is not None
    return Piece(name, param.tp_rank if sharded else 0, param.tp_size if sharded else 1, param.tp_dim,
                 tuple(param.shape), tuple(param.logical_shape), start, stop, DTYPE_NAMES[dtype])


def named_params(modules) -> list[tuple[str, torch.Tensor]]:
    """(logical name, parameter): a tied embedding's copy on the last stage loads as the embedding."""
    return [(logical_name(n, p), p) for m in modules for n, p in m.named_parameters()]


def _written_elsewhere(param) -> bool:
    """The last stage's copy of a tied embedding: the first stage writes the one tensor."""
    return getattr(param, "tied_copy", False)


def bucket_layout(optimizer, modules) -> list[list[tuple]]:
    """Per gradient bucket, (name, param, offset in the bucket) of each parameter it holds."""
    names = {id(p): n for n, p in named_params(modules)}
    return [[(names[id(p)], p, off) for p, off in zip(b.params, b.offsets)] for b in optimizer.buckets.buckets]


def my_pieces(modules, topo, optimizer=None) -> list[tuple[Piece, torch.Tensor]]:
    """This rank's pieces of `modules`' parameters (and of the optimizer's state), with the flat
    tensors they hold: views, to be copied before training goes on."""
    out = []
    for name, p in named_params(modules):
        if _written_elsewhere(p):
            continue
        n, i = _holders(p, topo)
        a, b = split(0, p.numel(), n, i)
        if b > a:
            out.append((_piece(name, p, a, b, p.dtype), p.detach().reshape(-1)[a:b]))
    if optimizer is None:
        return out
    for b, ((lo, hi), rows) in enumerate(zip(optimizer.ranges, bucket_layout(optimizer, modules))):
        state = optimizer.bucket_state(b)  # this rank's [lo, hi) of the bucket: all of it without ZeRO
        for name, p, off in rows:
            s, e = max(off, lo), min(off + p.numel(), hi)
            if s >= e or _written_elsewhere(p):
                continue  # under the distributed optimizer: another dp rank's
            if optimizer.distributed:  # only this dp rank holds [s, e); tp may replicate it
                n, i = p.tp_copies, p.tp_copy_rank
            else:
                n, i = _holders(p, topo)
            a, b = split(s, e, n, i)
            if b <= a:
                continue
            for k, flat in state.items():
                out.append((_piece(f"{name}.{k}", p, a - off, b - off, torch.float32), flat[a - lo:b - lo]))
    return out


def write_pieces(directory: Path, rank: int, pieces: list[tuple[Piece, torch.Tensor]]) -> int:
    """Write this rank's pieces to `directory/shards/rankNNNNN.safetensors`; returns the bytes."""
    if not pieces:
        return 0
    path = Path(directory) / file_name(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = StreamingSafetensorsWriter(path, [(pc.key, DTYPES[pc.dtype], (pc.stop - pc.start,)) for pc, _ in pieces])
    for pc, flat in pieces:
        writer.write(pc.key, flat)
    writer.close()
    return sum(flat.numel() * flat.element_size() for _, flat in pieces)


def gather_index(pieces: list[Piece], topo) -> dict | None:
    """Every rank's pieces, gathered on rank 0 as index.json's content (None elsewhere)."""
    if topo.world == 1:
        return index_record([pieces])
    everyone = [None] * topo.world if topo.rank == 0 else None
    dist.gather_object(pieces, everyone, dst=0, group=topo.world_group)
    return index_record(everyone) if topo.rank == 0 else None


def index_record(pieces_by_rank: list[list[Piece]]) -> dict:
    """index.json's content from every rank's pieces (rank order)."""
    tensors: dict[str, dict] = {}
    for rank, pieces in enumerate(pieces_by_rank):
        for pc in pieces:
            t = tensors.setdefault(pc.name, {"logical_shape": list(pc.logical_shape), "tp_dim": pc.tp_dim,
                                             "tp_size": pc.tp_size, "shard_shape": list(pc.shard_shape),
                                             "dtype": pc.dtype, "pieces": []})
            t["pieces"].append([pc.tp_rank, pc.start, pc.stop, file_name(rank), pc.key])
    return {"tensors": tensors}


def _elements(tf: TensorFile, key: str, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of tensor `key`, flat: a piece is 1-D; a whole tensor of format 1 or
    2 is read by rows when the range is whole rows (a shard cut along dimension 0), else whole."""
    shape = tf.shape(key)
    row = torch.Size(shape[1:]).numel() if len(shape) > 1 else 1
    if start % row == 0 and stop % row == 0:
        return tf.get_rows(key, 0, start // row, stop // row).reshape(-1)
    return tf.get(key).reshape(-1)[start:stop]


class PieceIndex:
    """Reads logical tensors, or any layout's shards of them, from a checkpoint's pieces."""

    def __init__(self, directory: Path, tensors: dict, files: dict | None = None, verify: bool = True,
                 require_checksums: bool = True):
        self.directory, self.tensors, self.auto_verify = Path(directory), tensors, verify
        self.require_checksums = require_checksums
        self._files: dict[str, TensorFile] = files or {}

    @classmethod
    def of_whole_tensors(cls, directory: Path, files: list[TensorFile], verify: bool = True) -> PieceIndex:
        """Format versions 1 and 2: whole logical tensors, each one piece of a single shard, in
        `files` (opened and checked by the caller, checksums where the version has them)."""
        tensors = {}
        for tf in files:
            for name in tf.names:
                shape = list(tf.shape(name))
                tensors[name] = {"logical_shape": shape, "tp_dim": None, "tp_size": 1, "shard_shape": shape,
                                 "dtype": DTYPE_NAMES[tf.dtype(name)],
                                 "pieces": [[0, 0, torch.Size(shape).numel(), tf.path.name, name]]}
        return cls(directory, tensors, {tf.path.name: tf for tf in files}, verify, require_checksums=False)

    @classmethod
    def open(cls, directory: Path, verify: bool = True) -> PieceIndex:
        """`verify`: check each piece's checksum the first time any of it is read (a rank that
        reads only slices of what another rank verifies passes False)."""
        path = Path(directory) / INDEX
        try:
            tensors = json.loads(path.read_text())["tensors"]
        except FileNotFoundError:
            raise CheckpointError(f"{str(path)!r} is missing: a checkpoint of format version 3 lists its pieces "
                                  "there") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{str(path)!r} cannot be read as a piece index: {err!r}") from None
        return cls(directory, tensors, verify=verify)

    def check(self, tensors: list[tuple[str, torch.Tensor]], verify: bool, missing=None) -> None:
        """Every (name, param) is here with the param's logical shape and every file its pieces
        are in exists; `verify`: every piece's checksum too. `missing(names)`: the error for
        absent names (default: the first one named)."""
        absent = [name for name, _ in tensors if name not in self.tensors]
        if absent:
            raise missing(absent) if missing else CheckpointError(
                f"checkpoint {str(self.directory)!r} has no tensor {absent[0]!r}")
        for name, param in tensors:
            if self.logical_shape(name) != tuple(param.logical_shape):
                raise CheckpointError(f"checkpoint {str(self.directory)!r}: {name} has shape "
                                      f"{self.logical_shape(name)}, the model expects {tuple(param.logical_shape)}")
            for *_, file, key in self.tensors[name]["pieces"]:
                tf = self._file(file)
                if self.require_checksums and not tf.has_checksums:
                    raise CheckpointError(f"tensor file {str(tf.path)!r} has no checksums, which format version 3 "
                                          "writes into every file: it was replaced or its header damaged")
                if verify:
                    tf.verify(key)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def logical_shape(self, name: str) -> tuple:
        return tuple(self._entry(name)["logical_shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def _entry(self, name: str) -> dict:
        if name not in self.tensors:
            raise CheckpointError(f"checkpoint {str(self.directory)!r} has no tensor {name!r}")
        return self.tensors[name]

    def _file(self, name: str) -> TensorFile:
        if name not in self._files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
            self._files[name] = TensorFile(path, verify=self.auto_verify)
        return self._files[name]

    def _flat(self, name: str, tp_rank: int, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of old shard `tp_rank` of `name`, from the pieces that overlap."""
        entry = self._entry(name)
        out = torch.empty(stop - start, dtype=DTYPES[entry["dtype"]])
        covered = 0
        for r, a, b, file, key in entry["pieces"]:
            s, e = max(a, start), min(b, stop)
            if r != tp_rank or s >= e:
                continue
            out[s - start:e - start] = _elements(self._file(file), key, s - a, e - a)
            covered += e - s
        if covered != stop - start:
            raise CheckpointError(f"checkpoint {str(self.directory)!r}: {name} (tp shard {tp_rank}) has "
                             f"{covered} of the {stop - start} elements [{start}, {stop}) it needs")
        return out

    def rows(self, name: str, dim: int | None, lo: int, hi: int) -> torch.Tensor:
        """The logical tensor's slab [lo, hi) of dimension `dim` (None: the whole tensor)."""
        entry = self._entry(name)
        logical, shard = entry["logical_shape"], entry["shard_shape"]
        if dim is None:  # the whole tensor: all of it along the dimension it was split on
            dim = entry["tp_dim"] if entry["tp_size"] > 1 else 0
            lo, hi = 0, logical[dim] if logical else 1
        if entry["tp_size"] > 1 and entry["tp_dim"] != dim:
            raise CheckpointError(f"checkpoint {str(self.directory)!r}: {name} was split along dim {entry['tp_dim']}, "
                             f"the model splits it along dim {dim}")
        if not logical:  # a scalar
            return self._flat(name, 0, 0, 1).reshape(())
        width = shard[dim] if entry["tp_size"] > 1 else logical[dim]  # old shard length along dim
        per_row = torch.Size(shard[dim + 1:]).numel()
        parts = []
        for r in range(entry["tp_size"]):
            o0, o1 = max(lo - r * width, 0), min(hi - r * width, width, logical[dim] - r * width)
            if o0 >= o1:
                continue
            if all(n == 1 for n in shard[:dim]):  # those rows are one flat range of the shard
                flat = self._flat(name, r, o0 * per_row, o1 * per_row)
                parts.append(flat.reshape(*shard[:dim], o1 - o0, *shard[dim + 1:]))
            else:
                whole = self._flat(name, r, 0, torch.Size(shard).numel()).reshape(shard)
                parts.append(whole.narrow(dim, o0, o1 - o0))
        return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]

    def logical(self, name: str) -> torch.Tensor:
        return self.rows(name, None, 0, 0)

    def local(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """`param`'s shard of the logical tensor `name` (zero rows where the vocabulary pads)."""
        shape = self.logical_shape(name)
        if shape != tuple(param.logical_shape):
            raise CheckpointError(f"checkpoint {str(self.directory)!r}: {name} has shape {shape}, the model expects "
                             f"{tuple(param.logical_shape)}")
        if param.tp_dim is None:
            return self.logical(name)
        d, width = param.tp_dim, param.shape[param.tp_dim]
        start = param.tp_rank * width
        stop = min(start + width, shape[d])
        if start >= stop:
            return torch.zeros(param.shape, dtype=self.dtype(name))
        piece = self.rows(name, d, start, stop)
        if piece.shape[d] < width:
            pad = list(piece.shape)
            pad[d] = width - piece.shape[d]
            piece = torch.cat([piece, piece.new_zeros(pad)], dim=d)
        return piece

