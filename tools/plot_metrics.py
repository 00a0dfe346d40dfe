#!/usr/bin/env python
"""Plot the loss curve (and the learning rate) of a run from its --metrics JSONL into a PNG.

    python tools/plot_metrics.py runs/demo/metrics.jsonl --out runs/demo/loss.png
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import cli  # noqa: E402
from llama.inputs import InputError, read_jsonl  # noqa: E402

KEYS = ("step", "loss", "lr")  # what each record of llama-train --metrics holds, among others


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog=Path(__file__).name, description=__doc__)
    parser.add_argument("metrics", help="the JSONL that llama-train --metrics wrote")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="training loss", help="the plot's title, before the first → last loss")
    return parser


def read_metrics(path) -> list[dict]:
    rows = []
    for n, record in read_jsonl(path, "metrics file"):
        missing = [k for k in KEYS if not isinstance(record.get(k), (int, float))]
        if missing:
            raise InputError(f"{path}:{n}: no number under {missing} (not a llama-train --metrics file?)")
        rows.append(record)
    if not rows:
        raise InputError(f"metrics file {str(path)!r} has no records")
    return rows


def run(args) -> int:
    rows = read_metrics(args.metrics)
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


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
