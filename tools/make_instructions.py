#!/usr/bin/env python
"""Write a synthetic instruction set (llama/sft.py, `synthetic_instructions`) as fine-tuning
JSONL: a training file and a held-out file whose letter strings never occur in training.

    python tools/make_instructions.py --out data/sft --train 8000 --test 200
        # data/sft/train.jsonl, data/sft/test.jsonl: e.g. {"prompt": "Count the letters: c a f",
        # "response": "3"}; every third record in the messages schema
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import cli  # noqa: E402
from llama.sft import TASKS, synthetic_instructions  # noqa: E402


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog=Path(__file__).name, description=__doc__)
    parser.add_argument("--out", required=True, help="writes OUT/train.jsonl and OUT/test.jsonl")
    parser.add_argument("--train", type=cli.int_at_least(1), default=8000, help="training records")
    parser.add_argument("--test", type=cli.int_at_least(1), default=200, help="held-out records")
    parser.add_argument("--tasks", default="repeat,first,last,count",
                        help=f"comma-separated, of {','.join(TASKS)} (reverse is much harder for a tiny model)")
    parser.add_argument("--seed", type=int, default=0, help="the training set's seed (the held-out set's: seed + 1)")
    return parser


def run(args) -> int:
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    train = synthetic_instructions(args.train, args.seed, tasks=tasks)
    test = synthetic_instructions(args.test, args.seed + 1, tasks=tasks, exclude={r["letters"] for r in train})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(train):,} training and {len(test):,} held-out instructions in {out}/train.jsonl, {out}/test.jsonl")
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
