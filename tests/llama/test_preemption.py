"""Preemption (llama/preemption.py): an exit signal that reaches ONE rank mid-step stops every rank
after the same step, with a checkpoint there from which the run continues float for float as if
it had never stopped; the exit duration on one rank does the same; bad flags are one line, exit 2."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama.preemption import Preemption, parse_exit_signals, unfinished
from llama.preemption import main as preemption_main
from llama.train import ByteDemoData, CheckpointOptions, main, train
from parallel.checkpoint import read_meta
from tests.distributed import run_on_ranks, topology
from tests.llama.test_startup import SMALL
from tests.llama.test_train_layouts import _run_config, _text

pytestmark = pytest.mark.timeout(120)
STEPS, SIGNAL_STEP, SIGNALLED_RANK = 8, 3, 3


class SignalDuringStep(ByteDemoData):
    """The test corpus; reading the samples of step `step` sends this process `sig`: a signal that
    lands in the middle of a step (before its forward), as a scheduler's does."""

    def __init__(self, seed: int, global_batch: int, step: int, sig: int):
        super().__init__(16, seed, _text())
        self.window, self.sig = range(step * global_batch, (step + 1) * global_batch), sig

    def samples(self, start, count):
        if start in self.window:
            os.kill(os.getpid(), self.sig)
        return super().samples(start, count)


def _rank(tp, pp, ckpt=None, signal_at=None, exit_minutes=None, sleep_s=0.0):
    """One rank's run of STEPS steps under a Preemption (installed for this run only): signal_at=
    (rank, step) signals that rank during that step; exit_minutes applies to rank 0 only."""
    topo = topology(tp, pp)
    run = _run_config(tp=tp, pp=pp, steps=STEPS)
    data = ByteDemoData(16, run.train.seed, _text())
    before = signal.getsignal(signal.SIGUSR1)
    if signal_at and signal_at[0] == topo.rank:
        data = SignalDuringStep(run.train.seed, run.train.global_batch, signal_at[1], signal.SIGUSR1)
    with Preemption((signal.SIGUSR1,), exit_minutes if topo.rank == 0 else None) as stop:
        time.sleep(sleep_s)  # so that rank 0 is past a tiny exit duration at the first step boundary
        result = train(run, topo, show_progress=False, data=data, ckpt=ckpt, preemption=stop)
    return dict(losses=result.losses, stopped=result.stopped, steps_done=result.steps_done,
                saved=str(result.saved) if result.saved else None,
                handler_restored=signal.getsignal(signal.SIGUSR1) == before)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes_exactly(tmp_path):
    root = str(tmp_path / "ckpt")
    straight = run_on_ranks(_rank, 4, 1, 2)  # pp=2 x dp=2, no signal: the reference (and no stop)
    assert all(r["stopped"] is None and r["steps_done"] == STEPS for r in straight)
    want = straight[0]["losses"]
    assert len(want) == STEPS

    stopped = run_on_ranks(_rank, 4, 1, 2, CheckpointOptions(root), signal_at=(SIGNALLED_RANK, SIGNAL_STEP))
    done = SIGNAL_STEP + 1  # the signalled step completes; every rank stops at its boundary
    for rank, r in enumerate(stopped):
        assert r["stopped"] == "on SIGUSR1", (rank, r)
        assert r["steps_done"] == done and r["losses"] == want[:done], (rank, r)
        assert r["saved"] == os.path.join(root, f"step_{done:06d}"), (rank, r)
        assert r["handler_restored"], rank  # the rank's SIGUSR1 handler was given back
    assert read_meta(root)["step"] == done and sorted(os.listdir(root)) == ["latest", f"step_{done:06d}"]
    assert unfinished(root)

    resumed = run_on_ranks(_rank, 4, 1, 2, CheckpointOptions(root, resume=root))
    for rank, r in enumerate(resumed):
        assert r["stopped"] is None and r["steps_done"] == STEPS, (rank, r)
        assert r["losses"] == want[done:], (rank, r["losses"], want[done:])  # identical floats
    assert read_meta(root)["step"] == STEPS and not unfinished(root)


def test_the_exit_duration_on_one_rank_stops_every_rank_after_the_first_step(tmp_path):
    root = str(tmp_path / "ckpt")
    out = run_on_ranks(_rank, 4, 2, 1, CheckpointOptions(root), exit_minutes=0.001, sleep_s=0.1)  # tp=2 x dp=2
    for rank, r in enumerate(out):
        assert r["stopped"].startswith("after --exit-duration-minutes") and r["steps_done"] == 1, (rank, r)
        assert len(r["losses"]) == 1 and r["saved"] == os.path.join(root, "step_000001"), (rank, r)
    assert out[0]["stopped"] == "after --exit-duration-minutes 0.001"
    assert read_meta(root)["step"] == 1


def test_exit_signal_names():
    assert parse_exit_signals("USR1") == (signal.SIGUSR1,)
    assert parse_exit_signals("sigterm, usr1,USR1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_exit_signals("none") == ()
    for bad in ("FOO", "KILL", "USR1,STOP", ""):
        with pytest.raises(ValueError, match=r"unknown signal .*choose from TERM, USR1, USR2, INT, HUP"):
            parse_exit_signals(bad)


@pytest.mark.parametrize("argv, message", [
    (["--exit-signal", "USR1,FOO"], "argument --exit-signal: unknown signal 'FOO'; choose from TERM, USR1"),
    (["--exit-duration-minutes", "0"], "argument --exit-duration-minutes: 0 must be > 0 minutes"),
    (["--exit-duration-minutes", "soon"], "argument --exit-duration-minutes: 'soon' is not a number of minutes")])
def test_bad_preemption_flags_are_one_line_before_anything_starts(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*SMALL, *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("llama-train: error: ") and message in err, err


def test_the_command_line_stops_saves_says_so_and_resumes(tmp_path, capsys):
    """One process: the exit duration passes before the first step boundary."""
    save = str(tmp_path / "run")
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        assert main([*SMALL, "--steps", "4", "--save", save, "--exit-duration-minutes", "0.0001"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert f"stopped at step 1 of 4 after --exit-duration-minutes 0.0001: checkpoint {save}/step_000001 saved; " \
               f"resume with --resume {save}" in lines, lines
        assert not any(line.startswith("loss: first step") for line in lines)
        assert preemption_main(["--unfinished", save]) == 0  # what the sbatch template asks before requeueing

        assert main([*SMALL, "--steps", "4", "--save", save, "--resume"]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"resumed from {re.escape(save)}/step_000001 at step 1", out) and "loss: first step" in out
        assert preemption_main(["--unfinished", save]) == 1 and preemption_main(["--unfinished", str(tmp_path)]) == 1

        assert main([*SMALL, "--steps", "4", "--exit-duration-minutes", "0.0001"]) == 0
        assert ("stopped at step 1 of 4 after --exit-duration-minutes 0.0001: nothing saved (no --save): "
                "the next run starts from step 0") in capsys.readouterr().out.splitlines()
    finally:
        signal.signal(signal.SIGUSR1, previous)  # main() keeps its handler to the end of the process


def test_sigterm_taken_by_exit_signal_stops_every_process_cleanly(tmp_path):
    """Two real llama-train processes (their fault heartbeat running, which otherwise answers SIGTERM
    with exit 143): with --exit-signal TERM,USR1 a SIGTERM to rank 1 is a clean stop of both."""
    from launcher.rendezvous import free_port
    port, save, metrics = free_port(), tmp_path / "run", tmp_path / "m.jsonl"
    argv = [sys.executable, "-m", "llama.train", *SMALL, "--steps", "2000", "--save", str(save), "--metrics",
            str(metrics), "--exit-signal", "TERM,USR1", "--timeout", "30"]
    procs = [subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[2], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "GLOO_SOCKET_IFNAME": "lo"}) for r in range(2)]
    try:
        deadline = time.time() + 90
        while not metrics.exists() or not metrics.read_text().strip():  # a step is done: signal now
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no step was made"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    stop = re.search(r"^stopped at step (\d+) of 2000 on SIGTERM: checkpoint (\S+) saved; resume with --resume (\S+)$",
                     outs[0][0], re.M)
    assert stop and stop.group(2, 3) == (f"{save}/step_{int(stop.group(1)):06d}", str(save)), outs[0]
    assert read_meta(save)["step"] == int(stop.group(1)) and "culprit" not in outs[0][1] + outs[1][1], outs
