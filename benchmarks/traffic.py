"""Bytes moved per step under tp, tp + sp, pp and dp, measured by `parallel.comm`'s counters,
beside the formulas (Korthikanti et al. 2022; llama-paper-facts.md). Expected ratio: 1.00.

    python -m benchmarks.traffic

Columns: the buffer bytes each kind of collective handled, and what one rank sends on a ring
(all-reduce 2(n−1)/n of the buffer, all-gather and reduce-scatter (n−1)/n).
"""
from __future__ import annotations

from parallel import comm
from tests.distributed import run_on_ranks
from tests.parallel.test_traffic import (
    B,
    H,
    S,
    _data_parallel_traffic,
    _layer_traffic,
    _pipeline_traffic,
    expected_bytes,
    expected_dp_bytes,
)


def _rows(label, measured, formula, n):
    for op in sorted(set(measured) | set(formula)):
        m, f = measured.get(op, 0), formula.get(op, 0)
        ratio = f"{m / f:.2f}" if f else "-"
        print(f"{label:>22} {op:>17} {m:>10,} {f:>10,} {ratio:>6} {comm.wire_bytes(op, m, n):>11,.0f}")


def main() -> None:
    print(f"fp32, b={B} s={S} h={H}, 2 ranks per group")
    print(f"{'what':>22} {'collective':>17} {'measured':>10} {'formula':>10} {'ratio':>6} {'wire/rank':>11}")
    for sp in (False, True):
        _rows("1 layer, tp=2" + (" + sp" if sp else ""), run_on_ranks(_layer_traffic, 2, 2, sp)[0],
              expected_bytes(B, S, H, sp), 2)
    m = 4
    sent = run_on_ranks(_pipeline_traffic, 2, m)
    _rows(f"pp=2, m={m}: stage 0", sent[0], {"p2p": m * B * S * H * 4}, 2)
    _rows(f"pp=2, m={m}: stage 1", sent[1], {"p2p": m * B * S * H * 4}, 2)
    for distributed in (False, True):
        traffic, padded, _ = run_on_ranks(_data_parallel_traffic, 2, distributed)[0]
        traffic.pop("norm_all_reduce", None)
        _rows("dp=2" + (" ZeRO-1" if distributed else ""), traffic, expected_dp_bytes(padded, distributed), 2)
    print("formulas: tp 4 all-reduces of b·s·h per layer; tp+sp 4 reduce-scatters + 4 all-gathers (+2 re-gathers of "
          "the inputs in backward, +2·h norm gradients); pp one activation forward and one gradient back per "
          "micro-batch; dp one all-reduce of the fp32 gradients (ZeRO-1: a reduce-scatter of them and an all-gather "
          "of the parameters: the same wire bytes)")


if __name__ == "__main__":
    main()
