"""llama-plan against the paper's own scale figures, and beside llm-analysis on the same inputs.

    python -m benchmarks.plan_vs_paper

1. Table 15 (carbon) from the GPU-hours, all four rows: MWh = GPU-hours x 400 W x PUE 1.1
   (printed truncated, as the paper does), tCO2eq = MWh x 0.385.
2. LLaMA-65B, 2048 A100-80GB, 2048-token sequences, 4M-token batches, 1.4T tokens: predicted
   tokens/s/GPU and days of the sbatch layout (launcher/slurm/llama-65b.sbatch) and of the best
   layout the planner finds, as ratios to the paper's 380 tokens/s/GPU and 21 days. Nothing in
   configs/hardware/gpus.yaml was fitted to these (each number names its source).
3. The same inputs through llm-analysis, when importable (see benchmarks/llm_analysis_65b.py).
"""
from __future__ import annotations

import math

from llama.config import load_config
from llama.hardware import load
from llama.perf_model import Layout, carbon, predict
from llama.plan import plan

TABLE_15 = {"7B": (82_432, 36, 14), "13B": (135_168, 59, 23), "33B": (530_432, 233, 90), "65B": (1_022_362, 449, 173)}
PAPER_TOKENS_PER_S, PAPER_DAYS = 380.0, 21.0
SBATCH = Layout(tp=8, pp=4, dp=64, vpp=5, micro_batch=1, sp=True, recompute="selective", distributed_optimizer=True)


def main() -> None:
    print("Table 15: model, GPU-hours, MWh (paper / ours), tCO2eq (paper / ours)")
    for name, (hours, mwh, tco2) in TABLE_15.items():
        energy, co2 = carbon(hours, 400)
        print(f"  {name:>4} {hours:>10,} {mwh:>4} / {math.floor(energy):<4} {tco2:>4} / {round(co2):<4}"
              f" {'exact' if (math.floor(energy), round(co2)) == (mwh, tco2) else 'DIFFERS'}")
    run = load_config("llama-65b")
    hw = load("a100-80gb")
    rows = [("sbatch layout", predict(run, SBATCH, hw, 1.4e12))]
    rows.append(("best layout", plan(run, 2048, hw, 1.4e12, {})[0][0]))
    rows.append(("best at mb 1, selective", plan(run, 2048, hw, 1.4e12, {"micro_batch": 1,
                                                                          "recompute": "selective"})[0][0]))
    print(f"\nLLaMA-65B on 2048 A100-80GB: paper {PAPER_TOKENS_PER_S:.0f} tokens/s/GPU, {PAPER_DAYS:.0f} days")
    print(f"  {'':<24} {'layout':<38} {'tok/s/GPU':>9} {'ratio':>6} {'days':>6} {'ratio':>6} {'GiB/GPU':>7}")
    for label, p in rows:
        print(f"  {label:<24} {str(p.layout):<38} {p.tokens_per_s_per_gpu:9.0f} "
              f"{p.tokens_per_s_per_gpu / PAPER_TOKENS_PER_S:6.2f} {p.days:6.1f} {p.days / PAPER_DAYS:6.2f} "
              f"{p.memory['total'] / 2**30:7.1f}")
    try:
        from benchmarks.llm_analysis_65b import llm_analysis_65b
        for eff in (None, 0.5):
            r = llm_analysis_65b(flops_efficiency=eff)
            label = f"llm-analysis {r['version']} fe={r['flops_efficiency']}"
            print(f"  {label:<24} {'tp8 pp4 dp64 (same inputs)':<38} {r['tokens_per_s_per_gpu']:9.0f} "
                  f"{r['tokens_per_s_per_gpu'] / PAPER_TOKENS_PER_S:6.2f} {r['days']:6.1f} "
                  f"{r['days'] / PAPER_DAYS:6.2f} {r['memory_gib']['total']:7.1f}")
    except RuntimeError as err:
        print(f"  llm-analysis: {err}")


if __name__ == "__main__":
    main()
