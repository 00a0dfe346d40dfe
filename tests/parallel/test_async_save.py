"""Saving in the background: the checkpoint holds the state at the step it was taken, however
training changes the tensors meanwhile; a write that fails in the thread fails on every rank
when the save is finished, and `latest` stays on the last complete checkpoint."""
import dataclasses
import resource
import signal
import time

import pytest
import torch

from llama.config import load_config
from parallel.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from parallel.checkpoint_pieces import named_params
from tests.distributed import run_on_ranks, topology

pytestmark = pytest.mark.timeout(180)


def _trained(topo):
    from llama.train import ByteDemoData, train
    run = load_config("tiny")
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, sources=[], tokenizer=""))
    t = run.train
    t.dp, t.distributed_optimizer, t.steps, t.micro_batch = 2, True, 1, 8
    result = train(run, topo, show_progress=False, data=ByteDemoData(t.seq_len, 0))
    return result.chunks, result.optimizer


def _state(chunks, optimizer):
    tensors = {n: p.detach().clone() for n, p in named_params(chunks)}
    for i in range(len(optimizer.ranges)):
        tensors.update({f"bucket{i}.{k}": v.clone() for k, v in optimizer.bucket_state(i).items()})
    return tensors


def _save_while_training(root):
    topo = topology(1, 1, 2)
    chunks, optimizer = _trained(topo)
    before = _state(chunks, optimizer)
    pending = save_checkpoint(root, 1, chunks, optimizer, topo, meta={"consumed_samples": 32}, background=True)
    with torch.no_grad():  # the next steps overwrite weights and Adam state while the thread writes
        for _, p in named_params(chunks):
            p.add_(1.0)
        for master in optimizer.masters:
            master.mul_(2.0)
    while not pending.all_done():  # one all-reduce a call: every rank leaves the loop together
        time.sleep(0.01)
    path = pending.finish()
    load_checkpoint(path, chunks, optimizer, topo)
    after = _state(chunks, optimizer)
    return all(torch.equal(before[k], after[k]) for k in before), sorted(before)


def test_a_background_save_holds_the_state_of_its_step(tmp_path):
    for same, names in run_on_ranks(_save_while_training, 2, tmp_path, timeout=150):
        assert same and any(n.endswith(".master") for n in names)
    assert (tmp_path / "latest").read_text() == "step_000001\n"


def _fail_in_the_thread(root):
    topo = topology(1, 1, 2)
    chunks, optimizer = _trained(topo)
    save_checkpoint(root, 1, chunks, optimizer, topo, meta={"consumed_samples": 32})
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    limit = 64 * 1024  # under each rank's pieces, above the index, meta.json and RNG states
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:  # the rank processes serve later tests: the limit goes with this one
        pending = save_checkpoint(root, 2, chunks, optimizer, topo, meta={"consumed_samples": 64}, background=True)
        pending.finish()
    except CheckpointError as err:
        return str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    return "no error"


def test_a_failed_background_write_fails_every_rank_and_keeps_latest(tmp_path):
    errors = run_on_ranks(_fail_in_the_thread, 2, tmp_path, timeout=150)
    for err in errors:
        assert err.startswith(f"cannot save checkpoint step_000002 in '{tmp_path}': ") and \
            err.endswith("'latest' still names step_000001"), errors
    assert "File too large" in errors[0] or "File too large" in errors[1], errors
    assert (tmp_path / "latest").read_text() == "step_000001\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]


def _run_saving(root, async_save: bool):
    from llama.train import ByteDemoData, CheckpointOptions, train
    from parallel.topology import build_topology
    run = load_config("tiny")
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, sources=[], tokenizer=""))
    run.train.steps, run.train.micro_batch = 6, 8
    ckpt = CheckpointOptions(str(root), save_every=2, async_save=async_save)
    return train(run, build_topology(), show_progress=False, data=ByteDemoData(run.train.seq_len, 0),
                 ckpt=ckpt).losses


def test_async_save_in_training_changes_neither_the_run_nor_the_checkpoints(tmp_path):
    from parallel.checkpoint_pieces import PieceIndex
    sync = _run_saving(tmp_path / "sync", False)
    background = _run_saving(tmp_path / "async", True)
    assert background == sync  # the same floats at every step
    assert (tmp_path / "async" / "latest").read_text() == "step_000006\n"
    for step in ("step_000002", "step_000004", "step_000006"):
        a, b = PieceIndex.open(tmp_path / "sync" / step), PieceIndex.open(tmp_path / "async" / step)
        assert sorted(a.tensors) == sorted(b.tensors)
        for name in a.tensors:
            assert torch.equal(a.logical(name), b.logical(name)), (step, name)
