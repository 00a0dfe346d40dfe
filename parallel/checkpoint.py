"""Layout-free checkpoints, written by every rank: each tensor (a parameter, its fp32 master
weight or Adam moment) is saved as pieces of its logical (whole, unpadded) tensor under its global
name, so any (tp, pp, dp, distributed optimizer or not) can load what any other saved.

    ROOT/step_000100/meta.json                    format version, step, config, data state, layout, Adam step
    ROOT/step_000100/index.json                   every piece of every tensor: tp shard, element range, file
    ROOT/step_000100/shards/rank00000.safetensors what rank 0 wrote …
    ROOT/step_000100/rng/rank00000.pt             each rank's RNG state (used on the same layout)
    ROOT/latest                                   the name of the newest complete checkpoint

Saving: every rank writes only what it holds, split with the other ranks that hold the same
(`parallel.checkpoint_pieces`): about 1/world of the bytes each, no gathers. All is written into
`step_N.tmp/`, renamed when complete, and `latest` is replaced last, so a process killed while
writing leaves the previous checkpoint in charge. A rank that cannot write (a full disk, a
directory it may not create) keeps taking part in the collectives, and every rank learns of it
before anything is renamed: all of them raise, and `latest` stays where it was. The last `keep`
are kept. With `background=True` a save returns once every rank has copied its pieces to host
memory, and a thread per rank writes them (`PendingSave`); the checkpoint is published (renamed,
`latest`) only when every rank's thread has finished and all agree, at a later step.

Loading reads each rank's slice straight from the pieces that overlap it (safetensors: never
unpickled). Format versions: 1, one file of whole logical tensors per stage and kind
(model-ppNNN, optim-ppNNN); 2, the same with a CRC-32 per tensor inside every file
(`parallel.tensor_files`); 3, pieces written by every rank, with checksums. All three load;
version 1 unverified.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import comm
from parallel.checkpoint_pieces import (
    INDEX,
    CheckpointError,
    PieceIndex,
    bucket_layout,
    gather_index,
    my_pieces,
    named_params,
    write_pieces,
)
from parallel.tensor_files import TensorFile, TensorFileError

FORMAT = "llama-parallel-checkpoint"
VERSION = 3  # 1: whole logical tensors per stage; 2: with a CRC-32 per tensor; 3: pieces from every rank
LOGICAL_FILES_VERSION = 2  # what llama-convert's native output (one process, whole tensors) is


def _barrier(topo) -> None:
    """Every rank has written its part. On gloo, monitored_barrier names a rank that never comes
    (its error says which), where a plain barrier would only time out."""
    if topo.world > 1:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(wait_all_ranks=True)
        else:
            dist.barrier()


def _device(modules) -> torch.device:
    return next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))


def _all_succeeded(ok: bool, topo, device) -> bool:
    """Whether every rank says ok: one all-reduce of a flag, so a failure on one rank reaches all."""
    if topo is None or topo.world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    comm.all_reduce(flag, topo.world_group, op=dist.ReduceOp.MIN, name="checkpoint_agreement")
    return flag.item() == 1.0


class _Attempt:
    """This rank's part of a save: its first file error is kept and its later file operations
    are skipped, while the caller goes on joining every gather, so no peer waits for it."""

    def __init__(self):
        self.error: Exception | None = None

    def __call__(self, fn, *args):
        if self.error is None:
            try:
                return fn(*args)
            except (OSError, TensorFileError, CheckpointError) as err:
                self.error = err
        return None


class _Save:
    """Where a save writes, and the one line every rank raises if any rank could not."""

    def __init__(self, root: Path, step: int, topo, device):
        self.root, self.name, self.topo, self.device = root, f"step_{step:06d}", topo, device
        self.tmp, self.final = root / f"{self.name}.tmp", root / self.name
        self.attempt = _Attempt()

    def agree(self) -> None:
        """Every rank has done its part; all raise if any failed (nothing has been renamed yet,
        or the rename is complete and only its aftermath failed: `latest` is then still right)."""
        _barrier(self.topo)
        if _all_succeeded(self.attempt.error is None, self.topo, self.device):
            return
        if self.topo.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)  # the partial files: a full disk wants its space back
        try:
            previous = (self.root / "latest").read_text().strip() or None
        except OSError:
            previous = None
        kept = f"'latest' still names {previous}" if previous else "no earlier checkpoint is affected"
        err = self.attempt.error
        why = f"{err}" if err is not None else "another rank could not write its part (its error says why)"
        raise CheckpointError(f"cannot save checkpoint {self.name} in {str(self.root)!r}: {why}; {kept}")


def save_checkpoint(root, step: int, modules, optimizer, topo, meta: dict, keep: int = 3,
                    background: bool = False):
    """Every rank calls this. Returns the checkpoint directory; with `background`, a PendingSave
    as soon as every rank has copied its pieces to host memory (its files are written in a
    thread; `finish()` completes it). Raises CheckpointError on every rank if any rank could not
    write its part; the previous checkpoint then stays in charge."""
    save = _Save(Path(root), step, topo, _device(modules))
    attempt, tmp = save.attempt, save.tmp
    if topo.rank == 0:
        attempt(_fresh_directory, tmp)
    save.agree()
    if optimizer is not None:
        optimizer.wait_params()  # the parameter all-gathers of an overlapped ZeRO step
    pieces = my_pieces(modules, topo, optimizer)
    if background:  # the copy training may overwrite from the next step on
        pieces = [(pc, flat.detach().to("cpu", copy=True)) for pc, flat in pieces]
    index = gather_index([pc for pc, _ in pieces], topo)
    record = None
    if topo.rank == 0:
        attempt((tmp / INDEX).write_text, json.dumps(index))
        record = {"format": FORMAT, "version": VERSION, "step": step,
                  "layout": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp,
                             "distributed_optimizer": bool(optimizer and optimizer.distributed)},
                  "adam_step": optimizer.adam_step if optimizer is not None else 0, **meta}
    attempt(_save_rng, tmp / "rng" / f"rank{topo.rank:05d}.pt")
    pending = PendingSave(save, record, keep, lambda: attempt(write_pieces, tmp, topo.rank, pieces))
    if background:
        pending.start()
        return pending
    pending.run()
    return pending.finish()


class PendingSave:
    """A save whose pieces are being written (in a thread when started in the background): every
    rank calls `finish()` at the same point, which waits for its own writer, agrees with the other
    ranks (all raise if any failed) and publishes the checkpoint. `all_done()` asks every rank,
    in one all-reduce, whether its writer has finished, so training can publish without waiting."""

    def __init__(self, save: _Save, record: dict | None, keep: int, write):
        self.save, self.record, self.keep, self.write = save, record, keep, write
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        self.write()

    def start(self) -> None:
        def write():
            try:
                self.write()
            except Exception as err:  # noqa: BLE001  whatever stops a thread must reach finish()
                self.save.attempt.error = self.save.attempt.error or err
        self.thread = threading.Thread(target=write, name=f"save {self.save.name}", daemon=True)
        self.thread.start()

    def all_done(self) -> bool:
        mine = self.thread is None or not self.thread.is_alive()
        return _all_succeeded(mine, self.save.topo, self.save.device)

    def finish(self) -> Path:
        if self.thread is not None:
            self.thread.join()
        self.save.agree()
        if self.save.topo.rank == 0:
            self.save.attempt(_publish, self.save, self.record, self.keep)
        self.save.agree()
        return self.save.final


def _fresh_directory(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    (tmp / "rng").mkdir(parents=True)


def _save_rng(path: Path) -> None:
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}
    try:
        torch.save(state, path)
    except RuntimeError as err:  # torch's zip writer names neither the file nor the cause's errno
        raise CheckpointError(f"cannot write {str(path)!r}: {err}") from None


def _publish(save: _Save, record: dict, keep: int) -> None:
    """meta.json, then the directory renamed into place, then `latest`: each step leaves `latest`
    naming a complete checkpoint. A checkpoint of the same step saved before is moved aside, not
    deleted, until the new one has its name."""
    root, tmp, final = save.root, save.tmp, save.final
    (tmp / "meta.json").write_text(json.dumps(record, indent=1))
    aside = root / f"{save.name}.old"
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(save.name + "\n")
    os.replace(latest_tmp, root / "latest")  # last: the checkpoint is complete
    shutil.rmtree(aside, ignore_errors=True)
    for old in sorted(root.glob("step_*[0-9]"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or a root whose `latest` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint (no meta.json, no 'latest')")
    return path


def read_meta(path) -> dict:
    """meta.json, checked: our format, a version this code reads (any up to VERSION), a layout."""
    file = resolve_checkpoint(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(file)!r} cannot be read as JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{str(file)!r} is not a {FORMAT} (format={got!r})")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{str(file)!r}: version={version!r} is not a format version (an integer >= 1)")
    if version > VERSION:
        raise CheckpointError(f"{str(file)!r}: format version {version} is newer than this code reads (versions "
                              f"1 to {VERSION}); upgrade llama-parallel to load it")
    layout = meta.get("layout")
    pp = layout.get("pp") if isinstance(layout, dict) else None
    if not isinstance(pp, int) or pp < 1:
        raise CheckpointError(f"{str(file)!r}: layout.pp={pp!r} is not a pipeline size (an integer >= 1)")
    return meta


def stage_files(directory, meta: dict, prefix: str, verify: bool = True) -> list[TensorFile]:
    """The `PREFIX-ppNNN.safetensors` of every pipeline stage the checkpoint was saved with,
    opened (headers only). A file that is not there is named as a missing file; from version 2
    on, a file without checksums is refused (it was replaced, or its header damaged)."""
    directory, pp = Path(directory), meta["layout"]["pp"]
    files = []
    for stage in range(pp):
        path = directory / f"{prefix}-pp{stage:03d}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing: a checkpoint saved at pp={pp} has one {prefix} file "
                                  f"per stage, {prefix}-pp000 to {prefix}-pp{pp - 1:03d}")
        tf = TensorFile(path, verify=verify)
        if meta["version"] >= 2 and not tf.has_checksums:
            raise CheckpointError(f"tensor file {str(path)!r} has no checksums, which format version "
                                  f"{meta['version']} writes into every file: it was replaced or its header damaged")
        files.append(tf)
    return files


def load_checkpoint(path, modules, optimizer, topo, weights_only: bool = False) -> dict:
    """Load a checkpoint saved at any layout into this rank's modules (and optimizer). Returns
    its meta.json. `weights_only` skips optimizer state and RNG (fine-tuning, evaluation); then
    `topo` may be None. Otherwise, with an optimizer, the checkpoint must hold the optimizer
    state of every parameter (a resume never silently starts Adam afresh).

    Everything that can be wrong with the files (missing, foreign, truncated, damaged, a tensor
    missing or of another shape) is found before anything is loaded; with a topology every rank
    then fails if any rank found something, instead of the others waiting in a collective of the
    loading (the distributed optimizer's gathers) or of the first step."""
    try:
        plan, error = _Plan(path, modules, optimizer, topo, weights_only), None
    except (CheckpointError, TensorFileError) as err:
        plan, error = None, err
    ok = _all_succeeded(error is None, topo, _device(modules))
    if error is not None:
        raise error
    if not ok:
        raise CheckpointError("another rank could not load the checkpoint (its error says why)")
    return plan.load(modules, optimizer, topo, weights_only)


class _Plan:
    """What this rank will read, checked: meta.json, the stage files (present, intact, with
    checksums where the version has them), every tensor this rank needs (present, of the model's
    shape) and, for a resume, every parameter's optimizer state.

    Checksums: a stage's writer rank (tp 0, dp 0) verifies every tensor its stage reads,
    optimizer state included, here, before the agreement; the other ranks read only their slices
    (not every tensor tp × dp times over) and learn of damage from the agreement. A process alone
    (no topology, or a world of one) verifies each tensor as it reads it, reading it only once."""

    def __init__(self, path, modules, optimizer, topo, weights_only: bool):
        self.path = resolve_checkpoint(path)
        self.meta = read_meta(self.path)
        verifier = topo is None or (topo.tp_rank == 0 and topo.dp_rank == 0)
        early = verifier and topo is not None and topo.world > 1  # loading has collectives: verify first
        params = named_params(modules)
        resume = optimizer is not None and not weights_only
        if self.meta["version"] >= 3:
            self.index = PieceIndex.open(self.path, verifier)
        else:  # one file per stage of whole tensors; the optimizer's only when a resume needs them
            files = stage_files(self.path, self.meta, "model", verifier)
            if resume and any(self.path.glob("optim-pp*.safetensors")):
                files += stage_files(self.path, self.meta, "optim", verifier)
            self.index = PieceIndex.of_whole_tensors(self.path, files, verifier)
        self.index.check(params, early)
        if resume:
            if not any(name.endswith(".exp_avg") for name in self.index.tensors):
                raise CheckpointError(f"checkpoint {str(self.path)!r} has no optimizer state (saved without an "
                                      "optimizer, or converted): --resume needs it; --init-from loads the weights "
                                      "alone, with a fresh optimizer")
            self.index.check([(f"{n}.{k}", p) for n, p in params for k in optimizer.STATE_KEYS], early,
                             missing=self._missing_state)

    def _missing_state(self, names: list[str]) -> CheckpointError:
        return CheckpointError(f"checkpoint {str(self.path)!r} lacks the optimizer state of {len(names)} tensors (the "
                               f"first: {names[0]!r}): --resume needs all of it; --init-from loads the weights alone")

    def load(self, modules, optimizer, topo, weights_only: bool) -> dict:
        if optimizer is not None:
            optimizer.wait_params()  # nothing in flight may overwrite what is loaded
        with torch.no_grad():
            for name, p in named_params(modules):
                p.copy_(self.index.local(name, p).to(p.dtype))
        if optimizer is not None:
            if weights_only:
                optimizer.masters_from_params()
            else:
                _load_optimizer(self.index, optimizer, bucket_layout(optimizer, modules), self.meta["adam_step"])
        if weights_only or topo is None:
            return self.meta
        same_layout = self.meta["layout"] == {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp,
                                              "distributed_optimizer": bool(optimizer and optimizer.distributed)}
        rng = self.path / "rng" / f"rank{topo.rank:05d}.pt"
        if same_layout and rng.is_file():
            state = torch.load(rng, weights_only=True)
            torch.set_rng_state(state["cpu"])
            if torch.cuda.is_available() and state["cuda"].numel():
                torch.cuda.set_rng_state(state["cuda"])
        return self.meta


def _load_optimizer(index: PieceIndex, optimizer, layout, adam_step: int) -> None:
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
