"""The trainer under a real `srun` (one SLURM node, and two emulated nodes) and a real `mpirun`,
at tp=2 × pp=2 on 4 ranks; and every rank exiting non-zero when one rank is killed mid-run."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launcher.real_launchers import ROOT, missing_mpi, missing_slurm, mpirun, requires, slurm_cluster, unavailable

# the tiny model on the byte corpus (no demo build needed): 4 ranks, tp=2, pp=2
TRAIN = ["-m", "llama.train", "--config", "configs/tiny.yaml", "--tp", "2", "--pp", "2", "--steps", "3",
         "--no-progress", "--set", "data.sources=[]", "--set", "data.tokenizer=''", "--set", "model.vocab_size=256",
         "--set", "model.dim=64", "--timeout", "60"]


def _assert_trained(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "loss: first step" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(params=[1, 2], ids=["one-node", "two-emulated-nodes"])
def slurm(request):
    with slurm_cluster(request.param, 16800 + 10 * request.param) as cluster:
        yield cluster


@requires(missing_slurm)
@pytest.mark.timeout(400)
def test_srun_trains_at_tp2_pp2(slurm):
    nodes = ["-N", str(len(slurm.names))]
    _assert_trained(slurm.srun([*nodes, "-n", "4", sys.executable, *TRAIN]))


@requires(missing_mpi)
@pytest.mark.timeout(400)
def test_mpirun_trains_at_tp2_pp2():
    reason = missing_mpi()
    if reason:
        unavailable(reason)
    _assert_trained(mpirun(4, [sys.executable, *TRAIN]))


@pytest.mark.timeout(200)
def test_killing_one_rank_makes_every_rank_exit_non_zero_within_the_timeout(tmp_path):
    """Four plain processes (MASTER_ADDR/PORT, RANK, WORLD_SIZE); rank 2 is killed during
    training; the others must all exit non-zero, well within --timeout."""
    from launcher.rendezvous import free_port
    port = free_port()
    args = [sys.executable, *TRAIN]
    args[args.index("--steps") + 1] = "100000"
    args[args.index("--timeout") + 1] = "20"
    procs = []
    for rank in range(4):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "4",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}
        procs.append(subprocess.Popen(args + ["--metrics", str(tmp_path / f"m{rank}.jsonl")], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    metrics = tmp_path / "m0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)
    assert metrics.exists(), "training never started"
    procs[2].send_signal(signal.SIGKILL)
    killed_at = time.time()
    for rank, p in enumerate(procs):
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {rank} was still running 40 s after rank 2 was killed (--timeout 20)")
    elapsed = time.time() - killed_at
    codes = [p.returncode for p in procs]
    assert codes[2] == -signal.SIGKILL and all(c != 0 for c in codes), codes
    errors = [p.stderr.read() for p in procs]
    assert all("culprit rank 2 (" in errors[r] for r in (0, 1, 3)), errors  # the killed rank, not a survivor
    print(f"\nall ranks exited {elapsed:.1f} s after rank 2 was killed: codes {codes}")
