"""Layout-free checkpoints: every tensor is saved as its logical (whole, unpadded) tensor under
its global name, so any (tp, pp, dp, distributed optimizer or not) can load what any other saved.

    ROOT/step_000100/meta.json                  step, config, data state, layout, Adam step
    ROOT/step_000100/model-pp000.safetensors    the parameters of pipeline stage 0 …
    ROOT/step_000100/optim-pp000.safetensors    their fp32 master weights and Adam moments
    ROOT/step_000100/rng/rank00000.pt           each rank's RNG state (used on the same layout)
    ROOT/latest                                 the name of the newest complete checkpoint

Saving: a stage's tensors are gathered over tp (and over dp for the sharded optimizer state)
one at a time and streamed to disk by that stage's rank with tp rank 0 and dp rank 0; all is
written into `step_N.tmp/`, renamed when complete, and `latest` is replaced last, so a process
killed while writing leaves the previous checkpoint in charge. The last `keep` are kept.
Loading reads each rank's slice straight from the files (safetensors: never unpickled).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import comm
from parallel.params import full_tensor
from parallel.tensor_files import StreamingSafetensorsWriter, TensorFile, TensorFileError

FORMAT = "llama-parallel-checkpoint"


class CheckpointError(RuntimeError):
    pass


def _barrier(topo) -> None:
    """Every rank has written its part. On gloo, monitored_barrier names a rank that never comes
    (its error says which), where a plain barrier would only time out."""
    if topo.world > 1:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(wait_all_ranks=True)
        else:
            dist.barrier()


def _named_params(modules):
    return [(n, p) for m in modules for n, p in m.named_parameters()]


def _bucket_layout(optimizer, modules):
    """Per bucket, (name, param, offset in the bucket) of each parameter it holds."""
    names = {id(p): n for n, p in _named_params(modules)}
    return [[(names[id(p)], p, off) for p, off in zip(b.params, b.offsets)] for b in optimizer.buckets.buckets]


def save_checkpoint(root, step: int, modules, optimizer, topo, meta: dict, keep: int = 3) -> Path:
    """Every rank calls this. Returns the checkpoint directory."""
    root = Path(root)
    name = f"step_{step:06d}"
    tmp, final = root / f"{name}.tmp", root / name
    if topo.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier(topo)
    writer = topo.tp_rank == 0 and topo.dp_rank == 0
    params = _named_params(modules)
    model_file = None
    if writer:
        model_file = StreamingSafetensorsWriter(tmp / f"model-pp{topo.pp_rank:03d}.safetensors",
                                                [(n, p.dtype, p.logical_shape) for n, p in params])
    for n, p in params:  # the same order on every tp rank: each full_tensor is one all-gather
        full = full_tensor(p.detach(), p, topo.tp_group)
        if writer:
            model_file.write(n, full)
    if writer:
        model_file.close()
    if optimizer is not None:
        _save_optimizer(tmp, optimizer, _bucket_layout(optimizer, modules), topo, writer)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)},
               tmp / "rng" / f"rank{topo.rank:05d}.pt")
    _barrier(topo)
    if topo.rank == 0:
        record = {"format": FORMAT, "version": 1, "step": step,
                  "layout": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp,
                             "distributed_optimizer": bool(optimizer and optimizer.distributed)},
                  "adam_step": optimizer.adam_step if optimizer is not None else 0, **meta}
        (tmp / "meta.json").write_text(json.dumps(record, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name + "\n")
        os.replace(latest_tmp, root / "latest")  # last: the checkpoint is complete
        for old in sorted(root.glob("step_*[0-9]"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(topo)
    return final


def _save_optimizer(tmp: Path, optimizer, layout, topo, writer: bool) -> None:
    keys = optimizer.STATE_KEYS
    out = None
    if writer:
        out = StreamingSafetensorsWriter(tmp / f"optim-pp{topo.pp_rank:03d}.safetensors",
                                         [(f"{n}.{k}", torch.float32, p.logical_shape) for rows in layout
                                          for n, p, _ in rows for k in keys])
    for i, bucket in enumerate(optimizer.buckets.buckets):
        state = optimizer.bucket_state(i)
        if optimizer.distributed:  # each dp rank holds a slice of the bucket: gather the whole bucket
            state = {k: _gather_bucket(v, bucket.numel, optimizer.buckets.dp_group) for k, v in state.items()}
        for n, p, off in layout[i]:
            for k in keys:
                local = state[k][off:off + p.numel()].view(p.shape)
                full = full_tensor(local, p, topo.tp_group)
                if writer:
                    out.write(f"{n}.{k}", full)
    if writer:
        out.close()


def _gather_bucket(shard: torch.Tensor, numel: int, group) -> torch.Tensor:
    if comm.group_size(group) == 1:
        return shard
    whole = torch.empty(numel, dtype=shard.dtype, device=shard.device)
    comm.all_gather_into(whole, shard, group)
    return whole


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or a root whose `latest` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint (no meta.json, no 'latest')")
    return path


def read_meta(path) -> dict:
    path = resolve_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path / 'meta.json')!r} is not a {FORMAT} (format={meta.get('format')!r})")
    return meta


class _Index:
    """Which file holds which tensor, over every `PREFIX-*.safetensors` of a checkpoint."""

    def __init__(self, directory: Path, prefix: str):
        self.files = {}
        for f in sorted(directory.glob(f"{prefix}-*.safetensors")):
            tf = TensorFile(f)
            for name in tf.names:
                self.files[name] = tf
        if not self.files:
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {prefix}-*.safetensors")

    def local(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logical tensor `name`, for `param`'s sharding."""
        if name not in self.files:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        tf = self.files[name]
        if tf.shape(name) != tuple(param.logical_shape):
            raise CheckpointError(f"{str(tf.path)!r}: {name} has shape {tf.shape(name)}, the model expects "
                                  f"{tuple(param.logical_shape)}")
        try:
            if param.tp_dim is None:
                return tf.get(name)
            local = param.shape[param.tp_dim]
            start = param.tp_rank * local
            stop = min(start + local, param.logical_shape[param.tp_dim])
            piece = tf.get_rows(name, param.tp_dim, min(start, stop), stop)
        except TensorFileError:
            raise
        except Exception as err:
            raise CheckpointError(f"{str(tf.path)!r}: cannot read {name}: {err}") from None
        if piece.shape[param.tp_dim] < local:  # vocabulary padding: zeros
            pad = list(piece.shape)
            pad[param.tp_dim] = local - piece.shape[param.tp_dim]
            piece = torch.cat([piece, piece.new_zeros(pad)], dim=param.tp_dim)
        return piece


def load_checkpoint(path, modules, optimizer, topo, weights_only: bool = False) -> dict:
    """Load a checkpoint saved at any layout into this rank's modules (and optimizer). Returns
    its meta.json. `weights_only` skips optimizer state and RNG (fine-tuning, evaluation); then
    `topo` may be None. With a topology, every rank fails if any rank cannot load (a stage whose
    tensors are missing, say), instead of the others waiting in their first collective."""
    if topo is None or topo.world == 1:
        return _load(path, modules, optimizer, topo, weights_only)
    try:
        meta, error = _load(path, modules, optimizer, topo, weights_only), None
    except (CheckpointError, TensorFileError) as err:
        meta, error = None, err
    device = next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))
    ok = torch.tensor([0.0 if error else 1.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=topo.world_group)
    if error is not None:
        raise error
    if ok.item() == 0:
        raise CheckpointError("another rank could not load the checkpoint (its error says why)")
    return meta


def _load(path, modules, optimizer, topo, weights_only: bool) -> dict:
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    index = _Index(path, "model")
    with torch.no_grad():
        for name, p in _named_params(modules):
            p.copy_(index.local(name, p).to(p.dtype))
    if optimizer is not None:
        if weights_only or not list(path.glob("optim-*.safetensors")):
            optimizer.masters_from_params()
        else:
            _load_optimizer(path, optimizer, _bucket_layout(optimizer, modules), meta["adam_step"])
    if weights_only or topo is None:
        return meta
    same_layout = meta["layout"] == {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp,
                                     "distributed_optimizer": bool(optimizer and optimizer.distributed)}
    rng = path / "rng" / f"rank{topo.rank:05d}.pt"
    if same_layout and rng.is_file():
        state = torch.load(rng, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and state["cuda"].numel():
            torch.cuda.set_rng_state(state["cuda"])
    return meta


def _load_optimizer(path: Path, optimizer, layout, adam_step: int) -> None:
    index = _Index(path, "optim")
    for i, (lo, hi) in enumerate(optimizer.ranges):
        flat = {k: torch.zeros(hi - lo, dtype=torch.float32, device=optimizer.masters[i].device)
                for k in optimizer.STATE_KEYS}
        for n, p, off in layout[i]:
            start, end = max(off, lo), min(off + p.numel(), hi)
            if start >= end:
                continue  # this parameter's state lives on another dp rank
            for k in optimizer.STATE_KEYS:
                local = index.local(f"{n}.{k}", p).reshape(-1)
                flat[k][start - lo:end - lo] = local[start - off:end - off]
        optimizer.load_bucket_state(i, flat, adam_step)

