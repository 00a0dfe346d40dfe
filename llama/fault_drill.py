"""Fault drills: one rank fails on purpose, the way ranks of real jobs fail.

`train.inject_fault: KIND@RANK:STEP` (e.g. `--set train.inject_fault=stop@1:3`) makes global
rank RANK fail at step STEP. The kinds, each a failure seen on large clusters:

| kind | what rank RANK does | like |
|---|---|---|
| kill | SIGKILL itself in its first forward of the step | a crashed node, the OOM killer |
| stop | SIGSTOP itself there: alive, silent, holding its sockets | a hung GPU, a wedged driver |
| forward | raises in that forward | a bug in the model code |
| optimizer | raises in the optimizer step | a bug in the update |
| nan | makes the step's loss NaN | a loss spike: the update is skipped, not a fault |
| handshake | announces another micro-batch count to its pipeline neighbours | ranks launched with different configs |

`tests/llama/test_faults.py` and `benchmarks/fault_matrix.py` drive them under each launcher.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time

KINDS = ("kill", "stop", "forward", "optimizer", "nan", "handshake")


class InjectedFault(RuntimeError):
    """The error a `forward` or `optimizer` drill raises."""


def parse(spec: str) -> tuple[str, int, int] | None:
    """'KIND@RANK:STEP' → (kind, rank, step); '' → None. Raises ValueError naming the rule."""
    if not spec:
        return None
    m = re.fullmatch(r"(\w+)@(\d+):(\d+)", spec)
    if not m or m.group(1) not in KINDS:
        raise ValueError(f"train.inject_fault={spec!r} must look like KIND@RANK:STEP, "
                         f"KIND one of {', '.join(KINDS)}")
    return m.group(1), int(m.group(2)), int(m.group(3))


def _poison_next_output(chunk) -> None:
    """The next output of `chunk` becomes NaN (so do the loss and every gradient after it)."""
    def hook(module, args, out):
        handle.remove()
        return out * float("nan")
    handle = chunk.register_forward_hook(hook)


def announce(kind: str, step: int) -> None:
    """One line with the wall time, from which benchmarks/fault_matrix.py measures time to exit."""
    print(f"fault drill: {kind} at step {step}, time {time.time():.3f}", file=sys.stderr, flush=True)


def _fail_in_next_forward(chunk, kind: str, step: int) -> None:
    def hook(module, args):
        handle.remove()
        announce(kind, step)
        if kind == "forward":
            raise InjectedFault(f"fault drill: an exception in forward at step {step}")
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    handle = chunk.register_forward_pre_hook(hook)


class FaultDrill:
    """Arms the configured fault on its rank at its step; inert everywhere else."""

    def __init__(self, spec: str, rank: int):
        parsed = parse(spec)
        self.kind, self.step = (parsed[0], parsed[2]) if parsed and parsed[1] == rank else (None, -1)

    def at_step_start(self, step: int, chunks, p2p) -> None:
        if step != self.step:
            return
        if self.kind in ("nan", "handshake"):
            announce(self.kind, step)
        if self.kind == "nan":
            _poison_next_output(chunks[0])
        elif self.kind in ("kill", "stop", "forward"):
            _fail_in_next_forward(chunks[0], self.kind, step)
        elif self.kind == "handshake":
            handshake = p2p.handshake
            p2p.handshake = lambda shape, dtype, m, *rest, **kw: handshake(shape, dtype, m + 1, *rest, **kw)

    def before_optimizer(self, step: int) -> None:
        if step == self.step and self.kind == "optimizer":
            announce(self.kind, step)
            raise InjectedFault(f"fault drill: an exception in the optimizer step at step {step}")
