"""Bytes one transformer layer moves per forward + backward under tp and tp + sp, measured by
`parallel.comm`'s counters, beside the formula of Korthikanti et al. (llama-paper-facts.md).

    python -m benchmarks.traffic [--tp 2]
"""
from __future__ import annotations

import argparse

from parallel import comm
from tests.distributed import run_on_ranks
from tests.parallel.test_traffic import B, H, S, _layer_traffic, expected_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    print(f"one LLaMA layer, b={B} s={S} h={H}, fp32, tp={args.tp}; buffer bytes per collective kind, "
          f"and per-rank ring wire bytes")
    print(f"{'layout':>8} {'collective':>15} {'measured':>10} {'formula':>10} {'ratio':>6} {'wire/rank':>10}")
    for sp in (False, True):
        measured = run_on_ranks(_layer_traffic, args.tp, args.tp, sp)[0]
        formula = expected_bytes(B, S, H, sp)
        for op in sorted(set(measured) | set(formula)):
            m, f = measured.get(op, 0), formula.get(op, 0)
            print(f"{'tp+sp' if sp else 'tp':>8} {op:>15} {m:>10} {f:>10} {m / f if f else float('nan'):>6.2f} "
                  f"{comm.wire_bytes(op, m, args.tp):>10.0f}")
    print("formula: tp: 4 all-reduces of b·s·h (2 forward, 2 backward); tp+sp: 4 reduce-scatters and 4 all-gathers "
          "of b·s·h, 2 more all-gathers (inputs re-gathered in backward), 2·h for the norm-weight gradients")


if __name__ == "__main__":
    main()
