"""Preemption and requeue under a real SLURM (a private one-node cluster, tests/launcher/real_launchers.py):
the real `launcher/slurm/tiny-cpu.sbatch`, submitted with sbatch (4 ranks, tp=2 x pp=2 x sp), gets
`scancel --signal=USR1` once it has made a step. The ranks stop at one step and save there, the
training step exits 0 with rank 0's one line, the script requeues the job, and the second start
resumes from `latest` and finishes. The two starts' losses together equal, float for float, those
of the same job left alone."""
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from parallel.checkpoint import read_meta
from tests.launcher.real_launchers import ROOT, VENV_BIN, missing_slurm, requires, slurm_cluster

pytestmark = pytest.mark.timeout(360)
STEPS = 30
TEMPLATE = "launcher/slurm/tiny-cpu.sbatch"
# llama-train flags after the template's name: the tiny model smaller, on the byte corpus (no demo build)
FLAGS = ["--set", "data.sources=[]", "--set", "data.tokenizer=''", "--set", "model.vocab_size=256",
         "--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "train.seq_len=32",
         "--set", "train.global_batch=4", "--set", "train.micro_batch=1", "--set", "train.warmup_steps=1",
         "--steps", str(STEPS), "--timeout", "60"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _sbatch(slurm, work: Path, name: str) -> str:
    """Submit the template as a user would (SAVE in the environment); returns the job id."""
    env = {**slurm.env, "SAVE": str(work / name), "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={work}/{name}.out", TEMPLATE, *FLAGS,
                           "--metrics", str(work / f"{name}.jsonl")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(slurm, job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=slurm.env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_until_ended(slurm, job: str, work: Path, name: str, timeout: float = 200) -> dict:
    deadline, idle_since = time.time() + timeout, None
    while time.time() < deadline:
        state = _job(slurm, job)
        if state.get("JobState") in ENDED:
            return state
        idle_since = (idle_since or time.time()) if _node_idle(slurm) else None
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime" and idle_since \
                and time.time() - idle_since >= 5:
            # SLURM holds a requeued batch job about two minutes (its BeginTime), not ours to test: start
            # it now, once the node has been idle a while. Moved as soon as the node looked idle, the
            # start could race the first one's teardown in slurmd ("Job 1 already killed, do not
            # launch batch job": FAILED 1:0, no output), in one run of CI out of several.
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, timeout=30)
            idle_since = None
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=slurm.env, timeout=30)
    pytest.fail(f"job {job} ({name}) still {state.get('JobState')} after {timeout:.0f} s:\n{_log(work, name)}")


def _node_idle(slurm) -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=slurm.env, capture_output=True, text=True, timeout=30)
    return out.stdout.split() == ["idle"]


def _slurmd_log(slurm) -> str:
    return "".join(p.read_text()[-3000:] for p in Path(slurm.dir).glob("slurmd-*.log"))


def _log(work: Path, name: str, tail: int | None = 4000) -> str:
    """The job's log (all its starts: the template appends), or its last `tail` characters."""
    path = work / f"{name}.out"
    text = path.read_text() if path.exists() else "(no log)"
    return text[-tail:] if tail else text


def _records(work: Path, name: str) -> list[dict]:
    path = work / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@requires(missing_slurm)
def test_scancel_usr1_saves_requeues_and_the_job_continues_with_the_same_losses():
    with slurm_cluster(1, 16950) as slurm:
        work = Path(tempfile.mkdtemp(prefix="llama-preemption-"))
        try:
            start = time.time()
            job = _sbatch(slurm, work, "preempted")
            deadline = time.time() + 120
            while len(_records(work, "preempted")) < 1:  # the job has made a step: signal it now
                assert time.time() < deadline and _job(slurm, job).get("JobState") not in ENDED, \
                    f"job {job} made no step:\n{_log(work, 'preempted')}"
                time.sleep(0.1)
            subprocess.run(["scancel", "--signal=USR1", job], env=slurm.env, check=True, timeout=30)
            signalled_at, signal_s = len(_records(work, "preempted")), time.time() - start
            state = _wait_until_ended(slurm, job, work, "preempted")
            preempted_s = time.time() - start
            log = _log(work, "preempted", tail=None)
            # the requeue proves the training step exited 0 (the script runs under set -e)
            assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), \
                f"{state}\n{log[-4000:]}\n--- slurmd ---\n{_slurmd_log(slurm)}"
            save = work / "preempted"
            stops = re.findall(rf"^stopped at step (\d+) of {STEPS} on SIGUSR1: checkpoint (\S+) saved; "
                               rf"resume with --resume (\S+)$", log, re.M)
            assert len(stops) == 1, log[-4000:]  # one line, from rank 0
            step = int(stops[0][0])
            assert signalled_at <= step < STEPS, (signalled_at, step)
            assert stops[0][1:] == (f"{save}/step_{step:06d}", str(save)), stops
            assert read_meta(save / f"step_{step:06d}")["step"] == step
            assert f"resumed from {save}/step_{step:06d} at step {step}" in log, log[-4000:]
            assert "Traceback" not in log and "llama-train: error" not in log, log[-4000:]

            reference = _sbatch(slurm, work, "straight")
            state = _wait_until_ended(slurm, reference, work, "straight")
            assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "0"), f"{state}\n{_log(work, 'straight')}"
            got, want = _records(work, "preempted"), _records(work, "straight")
            print(f"\nsignalled {signal_s:.0f} s after sbatch, stopped at step {step}; the requeued job ended at "
                  f"{preempted_s:.0f} s; the job left alone took {time.time() - start - preempted_s:.0f} s")
            assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(STEPS))
            assert [r["loss"] for r in got] == [r["loss"] for r in want]  # identical floats
        finally:
            shutil.rmtree(work, ignore_errors=True)
