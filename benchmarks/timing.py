"""Timing two ways of doing the same step in one process, where machine noise hits both.

The steps alternate (which goes first alternates too); the first round warms up and is dropped.
The ratio is the median over rounds of a's time / b's time within the same round: a slow spell
of the machine slows both members of a round, so it cancels in their ratio, where the ratio of
two medians would not cancel it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, before: Callable[[], None] = lambda: None):
    """Run every step `rounds` + 1 times, alternating; returns {name: [seconds per round]} without
    the warm-up round. `before()` runs untimed before each step (a barrier, zeroing gradients)."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in names if r % 2 else names[::-1]:
            before()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: t[1:] for name, t in times.items()}


def round_ratios(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    return [x / y for x, y in zip(times[a], times[b])]


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time (see the module docstring)."""
    return statistics.median(round_ratios(times, a, b))


def spread(times: dict[str, list[float]], a: str, b: str) -> str:
    """The middle half of the per-round ratios, 'q1-q3', to print beside the median."""
    q1, _, q3 = statistics.quantiles(round_ratios(times, a, b), n=4)
    return f"{q1:.2f}-{q3:.2f}"


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}
