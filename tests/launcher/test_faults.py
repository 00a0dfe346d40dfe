"""The fault matrix (issue 15), as tests: under real launchers one rank is killed, stopped, raises
in forward or in the optimizer step, produces a NaN loss, or disagrees in the pipeline handshake.
Every rank must be gone within --timeout + 30 s, each rank must print one line naming the
culprit, the launcher must exit non-zero, and the last complete checkpoint must resume.

The whole matrix (3 launchers × 4 layouts × 6 faults, with times) is
`python -m benchmarks.fault_matrix`; these tests run the cells that cover each fault, each
layout and each launcher once or more, in about three minutes.
"""
import shutil
import tempfile
from pathlib import Path

import pytest

from launcher import faults
from llama.fault_drill import parse
from tests.launcher.fault_runs import run_cell, verdict
from tests.launcher.real_launchers import missing_mpi, missing_slurm, requires, slurm_cluster, unavailable

CELLS = [("torchrun", "tp2pp2sp", f) for f in ("kill", "stop", "forward", "optimizer", "nan", "handshake")] + [
    ("torchrun", "tp2", "stop"), ("torchrun", "pp2", "kill"), ("torchrun", "dp2", "stop")]


def _check(cell):
    wrong = verdict(cell)
    assert not wrong, "\n".join(wrong) + "\n--- output ---\n" + cell.output[-4000:]
    print(f"\n{cell.launcher} {cell.layout} {cell.fault}: exit after {cell.exit_after_s} s, code {cell.code}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher,layout,fault", CELLS, ids=["-".join(c) for c in CELLS])
def test_fault_under_torchrun(launcher, layout, fault, tmp_path):
    _check(run_cell(launcher, layout, fault, tmp_path, resume=fault in ("stop", "forward")))


@requires(missing_mpi)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["stop", "forward"])
def test_fault_under_mpirun(fault, tmp_path):
    reason = missing_mpi()
    if reason:
        unavailable(reason)
    _check(run_cell("mpirun", "tp2pp2sp", fault, tmp_path, resume=fault == "stop"))


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster(1, 16900) as cluster:
        yield cluster


@requires(missing_slurm)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["kill", "optimizer"])
def test_fault_under_srun(fault, slurm):
    workdir = Path(tempfile.mkdtemp(prefix="llama-faults-"))
    try:
        _check(run_cell("srun", "tp2pp2sp", fault, workdir, slurm=slurm, resume=fault == "kill"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_peer_failures_are_told_from_a_rank_s_own():
    assert faults.is_peer_failure(RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert faults.is_peer_failure(RuntimeError("Timed out waiting 8000ms for recv operation to complete"))
    assert faults.is_peer_failure(RuntimeError("Rank 1 failed to pass monitoredBarrier in 8000 ms"))
    assert faults.is_peer_failure(RuntimeError("Application timeout caused pair closure"))
    assert not faults.is_peer_failure(ValueError("shapes do not match"))
    assert not faults.is_peer_failure(RuntimeError("pipeline stages disagree: stage 0 has ..."))


def test_gloo_errors_shrink_to_their_first_sentence():
    err = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                       "[127.0.0.1]:2219. This is typically caused by a remote worker crashing. GLHF!")
    assert faults._first_line(err) == "RuntimeError: Connection closed by peer [127.0.0.1]:2219"


def test_a_fault_drill_must_name_a_kind_a_rank_and_a_step():
    assert parse("stop@3:2") == ("stop", 3, 2)
    assert parse("") is None
    with pytest.raises(ValueError, match="KIND@RANK:STEP"):
        parse("explode@1:2")


@pytest.mark.timeout(120)
def test_a_layout_error_is_one_line_from_rank_0_under_torchrun():
    """Every rank finds the same bad layout before any collective: rank 0 says so once, the
    others exit 2 quietly, and the launcher's summary follows (README, "When a rank fails")."""
    import subprocess

    from tests.launcher.fault_runs import TRAIN, command
    from tests.launcher.real_launchers import ROOT
    cmd, env = command("torchrun", 2, [*TRAIN, "--tp", "3"])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=100)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("llama-train: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "tp*pp=3*1" in errors[0] and "exitcode  : 2" in proc.stderr, errors


def _culprit_seen_by_each_rank(scenario: str):
    """Three ranks with heartbeats; rank 2 goes silent (its heartbeat stops without an exit
    beat, as a killed or stopped process), or rank 1 raises an error of its own."""
    import torch.distributed as dist
    rank = dist.get_rank()
    faults.start(rank, 3, timeout_s=4)
    dist.barrier()
    if scenario == "silent" and rank == 2:
        faults._heartbeat.stop_event.set()
        faults._heartbeat.thread.join()
    if scenario == "own" and rank == 1:
        faults.set_phase("step 7: optimizer")
        seen = faults.culprit(ValueError("a bug of its own"), rank, 3, 4)
    dist.barrier()
    if scenario == "silent":
        seen = faults.culprit(RuntimeError("Connection closed by peer"), rank, 3, 4) if rank < 2 else None
    elif rank != 1:
        seen = faults.culprit(RuntimeError("Timed out waiting 4000ms for recv"), rank, 3, 4)
    dist.barrier()
    faults.stop()
    faults.set_phase("starting")
    if rank == 0:
        store = dist.distributed_c10d._get_default_store()
        store.delete_key(faults._FIRST)
    dist.barrier()
    return seen


@pytest.mark.timeout(120)
def test_survivors_name_the_silent_rank_not_each_other():
    from tests.distributed import run_on_ranks
    seen = run_on_ranks(_culprit_seen_by_each_rank, 3, "silent")
    assert all(s.startswith("rank 2 (") and "did not answer" in s for s in seen[:2]), seen


@pytest.mark.timeout(120)
def test_a_rank_whose_own_code_raised_is_the_culprit_for_everyone():
    from tests.distributed import run_on_ranks
    seen = run_on_ranks(_culprit_seen_by_each_rank, 3, "own")
    assert all(s.startswith("rank 1 (") and "failed during step 7: optimizer: ValueError: a bug of its own" in s
               for s in seen), seen
