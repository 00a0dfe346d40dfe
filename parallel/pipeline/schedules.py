"""Pipeline schedules: GPipe, 1F1B, interleaved 1F1B (Narayanan et al. 2021) and forward-only.

A schedule is only an order: the list of (F or B, micro-batch, model chunk) one pipeline rank
runs. `lockstep_plan` turns every rank's order into steps, and `run_schedule` executes a rank's
steps: compute one action, then exchange with the neighbours, in one group, exactly the
messages made in that step. Losses are averaged over micro-batches: each micro-batch's mean
loss is scaled by 1/m before its backward, so gradients equal one pass over the whole batch.

    gpipe        all m forwards, then all m backwards: m micro-batches of activations kept
    1f1b         pp − rank − 1 warm-up forwards, then one forward / one backward: at most pp kept
    interleaved  1F1B over vpp model chunks per rank: the bubble shrinks by vpp; m % pp == 0
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from parallel.pipeline.p2p import PipelineP2P

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class ScheduleError(ValueError):
    """A schedule cannot run with these numbers; raised before any transfer."""


def check_schedule(schedule: str, m: int, pp: int, vpp: int) -> None:
    if schedule not in SCHEDULES:
        raise ScheduleError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    if m < 1:
        raise ScheduleError(f"the number of micro-batches m={m} must be at least 1")
    if vpp > 1 and schedule != "interleaved":
        raise ScheduleError(f"vpp={vpp} model chunks per rank need schedule='interleaved', not {schedule!r}")
    if schedule == "interleaved" and m % pp:
        raise ScheduleError(f"the interleaved schedule needs the number of micro-batches (m={m}) to be a "
                            f"multiple of pp={pp}")


def _virtual(k: int, pp: int, vpp: int, backward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward (or backward) of a rank in interleaved order:
    pp micro-batches through chunk 0, the same pp through chunk 1, …, then the next pp."""
    group, within = divmod(k, pp * vpp)
    chunk = within // pp
    return group * pp + within % pp, (vpp - 1 - chunk if backward else chunk)


def schedule_order(schedule: str, m: int, pp: int, pp_rank: int, vpp: int = 1) -> list[tuple[str, int, int]]:
    """The (kind, micro-batch, chunk) actions rank `pp_rank` runs, in order."""
    check_schedule(schedule, m, pp, vpp)
    if schedule == "gpipe":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    total = m * vpp
    if schedule == "1f1b":
        warmup = min(pp - pp_rank - 1, m)
    elif m == pp:  # interleaved with no steady state: all forwards first
        warmup = total
    else:
        warmup = min(total, (pp - pp_rank - 1) * 2 + (vpp - 1) * pp)
    fwd = [("F", *_virtual(k, pp, vpp, False)) for k in range(total)]
    bwd = [("B", *_virtual(k, pp, vpp, True)) for k in range(total)]
    order = fwd[:warmup]
    for k in range(total - warmup):
        order += [fwd[warmup + k], bwd[k]]
    return order + bwd[total - warmup:]


def forward_only_order(m: int, pp: int, vpp: int = 1) -> list[tuple[str, int, int]]:
    if vpp == 1:
        return [("F", i, 0) for i in range(m)]
    check_schedule("interleaved", m, pp, vpp)
    return [("F", *_virtual(k, pp, vpp, False)) for k in range(m * vpp)]


@dataclass
class StageStats:
    """What one pipeline rank did during a step."""
    busy_s: float = 0.0            # computing (forward and backward)
    idle_s: float = 0.0            # blocked on receives
    wall_s: float = 0.0
    peak_in_flight: int = 0        # most micro-batches whose activations were kept at once
    losses: list[float] = field(default_factory=list)

    @property
    def bubble(self) -> float:
        return self.idle_s / self.wall_s if self.wall_s else 0.0


def _tag(m: int, virtual_stage: int, mb: int, grad: bool) -> int:
    """A transfer's tag: which micro-batch, into which virtual stage, which direction."""
    return 1 + 2 * (virtual_stage * m + mb) + int(grad)


@dataclass
class Phase:
    """One step of a rank's plan: compute at most one action, then exchange, in one group with
    its neighbours, exactly the messages produced in this step that concern it."""
    action: tuple | None = None               # ("F" | "B", micro-batch, chunk)
    send: tuple | None = None                 # the message the action produces
    recvs: list = field(default_factory=list)  # messages produced this step for this rank


def _needs(kind: str, mb: int, j: int, n_virtual: int):
    """The message an action waits for: its input activation, or its output's gradient."""
    if kind == "F":
        return None if j == 0 else ("act", mb, j)
    return None if j == n_virtual - 1 else ("grad", mb, j)


def _makes(kind: str, mb: int, j: int, n_virtual: int):
    if kind == "F":
        return None if j == n_virtual - 1 else ("act", mb, j + 1)
    return None if j == 0 else ("grad", mb, j - 1)


def lockstep_plan(orders: list[list[tuple]], pp: int, vpp: int) -> list[list[Phase]]:
    """Every rank's phases, from every rank's order: at each step a rank runs its next action if
    that action's input was produced at an earlier step. A message made at step t is received by
    its destination in the same step t, in the same group as it is sent: so on every channel the
    sends and receives pair up in the same order on both sides, and no rank ever waits in a send
    for a receive that its peer has not posted (what makes NCCL's rendezvous sends safe)."""
    n_virtual = pp * vpp
    ptr, produced = [0] * pp, {}
    plan: list[list[Phase]] = [[] for _ in range(pp)]
    step = 0
    while any(ptr[r] < len(orders[r]) for r in range(pp)):
        made, progressed = [], False
        for r in range(pp):
            phase = Phase()
            if ptr[r] < len(orders[r]):
                kind, mb, c = orders[r][ptr[r]]
                j = c * pp + r
                need = _needs(kind, mb, j, n_virtual)
                if need is None or produced.get(need, step) < step:
                    phase.action, phase.send = (kind, mb, c), _makes(kind, mb, j, n_virtual)
                    ptr[r] += 1
                    progressed = True
                    if phase.send:
                        made.append(phase.send)
            plan[r].append(phase)
        for msg in made:
            produced[msg] = step
            plan[msg[2] % pp][step].recvs.append(msg)
        if not progressed:
            raise ScheduleError("the ranks' orders wait on each other: not a valid pipeline schedule")
        step += 1
    return plan


@functools.lru_cache(maxsize=16)
def _plan(schedule: str, m: int, pp: int, vpp: int, forward_only: bool) -> list[list[Phase]]:
    """Every rank's plan; the same every training step, so made once."""
    orders = [forward_only_order(m, pp, vpp) if forward_only else schedule_order(schedule, m, pp, r, vpp)
              for r in range(pp)]
    return lockstep_plan(orders, pp, vpp)


def _source(msg, pp: int) -> int:
    """The pipeline rank that sends message `msg`."""
    kind, _, j = msg
    return (j - 1) % pp if kind == "act" else (j + 1) % pp


def run_schedule(schedule: str, chunks, micro_batches, p2p: PipelineP2P, pp: int, pp_rank: int,
                 activation_shape, dtype, forward_only: bool = False):
    """Run `schedule` on this rank's model `chunks` (its vpp Transformer stages).

    micro_batches: a list of (tokens, targets); the first virtual stage reads tokens, the last
    targets. A third item, packed examples' `llama.packing.Packing`, goes to every stage.
    Returns StageStats; `losses` holds each micro-batch's loss on the last stage.
    """
    m, vpp = len(micro_batches), len(chunks)
    plan = _plan(schedule, m, pp, vpp, forward_only)[pp_rank]
    stats = StageStats()
    start_wall = time.perf_counter()
    p2p.handshake(activation_shape, dtype, m, vpp, SCHEDULES.index(schedule), device=micro_batches[0][0].device)
    p2p.wait_s = 0.0
    inputs, outputs, inbox = {}, {}, {}
    losses: dict[int, float] = {}
    for phase in plan:
        produced = None
        if phase.action is not None:
            kind, mb, c = phase.action
            chunk, j = chunks[c], c * pp + pp_rank
            if kind == "F":
                tokens, targets, *packing = micro_batches[mb]  # packed examples: every stage needs them
                kw = {"packing": packing[0]} if packing else {}
                x = tokens if chunk.first_stage else inbox.pop(("act", mb, j))().requires_grad_(not forward_only)
                t0 = time.perf_counter()
                with torch.set_grad_enabled(not forward_only):
                    out = chunk(x, targets, **kw) if chunk.last_stage else chunk(x, **kw)
                stats.busy_s += time.perf_counter() - t0
                if chunk.last_stage:
                    losses[mb] = out.item()
                    out = out / m
                produced = out
                if not forward_only:
                    inputs[mb, c], outputs[mb, c] = x, out
                    stats.peak_in_flight = max(stats.peak_in_flight, len(outputs))
            else:
                x, out = inputs.pop((mb, c)), outputs.pop((mb, c))
                grad = None if chunk.last_stage else inbox.pop(("grad", mb, j))()
                t0 = time.perf_counter()
                torch.autograd.backward(out, grad)
                stats.busy_s += time.perf_counter() - t0
                produced = x.grad
        sends = [(produced, phase.send[2] % pp, _tag(m, phase.send[2], phase.send[1], phase.send[0] == "grad"))] \
            if phase.send else []
        recvs = [(_source(msg, pp), _tag(m, msg[2], msg[1], msg[0] == "grad")) for msg in phase.recvs]
        if sends or recvs:
            for msg, take in zip(phase.recvs, p2p.exchange(sends, recvs)):
                inbox[msg] = take  # waited for only when the tensor is needed
    p2p.flush()
    stats.idle_s = p2p.wait_s
    stats.wall_s = time.perf_counter() - start_wall
    stats.losses = [losses[i] for i in sorted(losses)]
    return stats
