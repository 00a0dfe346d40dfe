#!/usr/bin/env python
"""Plot the loss curve (and the learning rate) of a run from its --metrics JSONL into a PNG.

    python tools/plot_metrics.py runs/demo/metrics.jsonl --out runs/demo/loss.png
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="training loss")
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.metrics) if line.strip()]
    if not rows:
        print(f"plot_metrics: {args.metrics} has no records", file=sys.stderr)
        return 2
    steps = [r["step"] for r in rows]
    fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=120)
    loss_ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (nats per token)", color="tab:blue")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    loss_ax.set_title(f"{args.title}: {rows[0]['loss']:.2f} → {rows[-1]['loss']:.2f}")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
