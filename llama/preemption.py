"""Stop cleanly before the scheduler does: on a signal, or past a wall-clock budget, every rank
stops at the same step boundary, the trainer saves a checkpoint there and exits 0, and the next
run (a requeued job) resumes from it.

- The signal handler only records which signal came (no I/O, no locks: it runs between two
  bytecodes of whatever the main thread was doing, possibly inside a collective's Python frame).
- A signal reaches one rank or all of them, at different moments: a rank cannot stop on its own
  (its peers would wait for it in the next collective). So at every step boundary each rank
  contributes [the signal it received, whether its own clock passed --exit-duration-minutes] to
  ONE all-reduce (MAX, 16 bytes, world group, on the training device); all ranks see the same
  answer and stop after the same step.
- The exit duration is measured on each rank from the Preemption's creation: the start of
  `llama-train`'s main(), before the process group exists (close to the job's start, which is
  what a scheduler's time limit counts from). MAX makes the first rank past it stop them all.

Signal choice (`--exit-signal`, default USR1): SLURM sends it with `--signal=USR1@300` to every
task of the job's steps, and (with PreemptParameters=send_user_signal) on preemption. SIGTERM is
not in the default because launchers send it to the survivors of a failed rank, where
`launcher/faults.py` answers it with the culprit line and exit 143; `--exit-signal TERM,USR1`
takes SIGTERM for a clean stop instead (torchrun, Kubernetes). Taking SIGUSR1 replaces the
stack dump `launcher/faults.py` registers on it; `--exit-signal none` keeps that.

    python -m llama.preemption --unfinished DIR   exit 0 when DIR's latest checkpoint is short of its
                                                  run's train.steps (a stopped run: requeue it), else 1
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

import torch
import torch.distributed as dist

from llama.cli import Parser, fail
from parallel import comm
from parallel.checkpoint import CheckpointError, read_meta

# Signals a user may choose: catchable, and not ones the runtime itself relies on (SEGV, CHLD, PIPE).
CHOICES = ("TERM", "USR1", "USR2", "INT", "HUP")
DEFAULT = "USR1"


def parse_exit_signals(text: str) -> tuple[signal.Signals, ...]:
    """`USR1`, `SIGTERM`, `term,usr1` or `none` → the signals; anything else is one line naming it."""
    if text.strip().lower() == "none":
        return ()
    out: list[signal.Signals] = []
    for item in text.split(","):
        name = item.strip().upper().removeprefix("SIG")
        if name not in CHOICES:
            raise ValueError(f"--exit-signal {text!r}: unknown signal {item.strip()!r}; choose from "
                             f"{', '.join(CHOICES)} (a comma list, e.g. TERM,USR1), or none")
        if getattr(signal, f"SIG{name}") not in out:
            out.append(getattr(signal, f"SIG{name}"))
    return tuple(out)


def exit_signals_arg(text: str) -> tuple[signal.Signals, ...]:
    """argparse type for --exit-signal: a bad name is argparse's one-line error, exit 2."""
    try:
        return parse_exit_signals(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--exit-signal {text!r}: ")) from None


def minutes_arg(text: str) -> float:
    """argparse type for --exit-duration-minutes: a positive number of minutes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} must be > 0 minutes")
    return value


class Preemption:
    """The stop request of one rank: install() the handlers, agree() at every step boundary."""

    def __init__(self, signals=(signal.SIGUSR1,), exit_minutes: float | None = None, clock=time.monotonic):
        self.signals, self.exit_minutes, self.clock = tuple(signals), exit_minutes, clock
        self.started = clock()
        self.received = 0        # the number of the last exit signal this rank got; 0: none
        self._previous: dict = {}
        self._wakeup_fd: int | None = None

    def _handler(self, signum, frame) -> None:
        self.received = signum   # only a flag: the step boundary acts on it

    def install(self) -> Preemption:
        """Take the exit signals. Idempotent: call it again after something else took one of them
        (faults.start gives SIGUSR1 to faulthandler and SIGTERM to the heartbeat)."""
        for sig in self.signals:
            previous = signal.signal(sig, self._handler)
            self._previous.setdefault(sig, previous)
            signal.siginterrupt(sig, False)  # restart interrupted system calls (gloo's sockets) instead of EINTR
        if signal.SIGTERM in self.signals:
            # faults' heartbeat learns of SIGTERM through the wakeup fd and exits 143: not now.
            fd = signal.set_wakeup_fd(-1)
            self._wakeup_fd = fd if self._wakeup_fd is None else self._wakeup_fd
        return self

    def uninstall(self) -> None:
        """Give the signals back as they were before the first install() (for callers that go on
        running: tests; llama-train keeps its handlers to the end, so a late signal is ignored)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self._wakeup_fd is not None:
            signal.set_wakeup_fd(self._wakeup_fd)
            self._wakeup_fd = None

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def over_time(self) -> bool:
        return self.exit_minutes is not None and self.clock() - self.started > 60 * self.exit_minutes

    def agree(self, topo, device) -> str | None:
        """Every rank calls this at the same step boundary: why all stop now ('on SIGUSR1', 'after
        --exit-duration-minutes 30'), the same on every rank, or None to go on. One all-reduce."""
        mine = torch.tensor([self.received, int(self.over_time())], dtype=torch.int64, device=device)
        comm.all_reduce(mine, topo.world_group, op=dist.ReduceOp.MAX, name="stop_all_reduce")
        signum, over = (int(v) for v in mine.tolist())
        if signum:  # the highest signal number any rank got: a deterministic choice when they differ
            return f"on {signal.Signals(signum).name}"
        if over:  # another rank's limit when this one has none (every rank of llama-train has the same)
            return "after --exit-duration-minutes" + (f" {self.exit_minutes:g}" if self.exit_minutes else "")
        return None


def stopped_line(step: int, steps: int, reason: str, saved, save_dir: str | None) -> str:
    """Rank 0's one line when a run stops early."""
    where = (f"checkpoint {saved} saved; resume with --resume {save_dir}" if saved is not None
             else "nothing saved (no --save): the next run starts from step 0")
    return f"stopped at step {step} of {steps} {reason}: {where}"


def unfinished(save_dir) -> bool:
    """Whether the latest checkpoint under `save_dir` is short of its run's train.steps: a run that
    stopped early (exit 0), which a job script requeues. No checkpoint, or a finished run: False."""
    try:
        meta = read_meta(save_dir)
    except CheckpointError:
        return False
    return meta["step"] < meta["config"]["train"]["steps"]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m llama.preemption", description=__doc__)
    p.add_argument("--unfinished", metavar="DIR", required=True,
                   help="exit 0 when DIR's latest checkpoint is short of its train.steps, else 1")
    args = p.parse_args(argv)
    try:
        return 0 if unfinished(args.unfinished) else 1
    except (KeyError, TypeError, ValueError) as err:  # a meta.json without step or config
        return fail(p.prog, f"{args.unfinished!r}: cannot read the checkpoint's step and train.steps: {err}")


if __name__ == "__main__":
    sys.exit(main())
