#!/usr/bin/env python
"""Exact-match accuracy of a model's greedy responses on held-out instructions (fine-tuning
JSONL, llama/sft.py): each record's prompt rendered by the template, the response generated up
to EOS and compared with the record's, surrounding whitespace stripped.

    python tools/eval_instructions.py --checkpoint runs/sft/ckpt --tokenizer data/demo/tokenizer.model \\
        --input data/sft/test.jsonl --show 5
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import cli  # noqa: E402
from llama.generate import load_model  # noqa: E402
from llama.inputs import read_jsonl  # noqa: E402
from llama.sft import messages_of, response_accuracy  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog=Path(__file__).name, description=__doc__)
    parser.add_argument("--checkpoint", required=True, nargs="+", help="one or more checkpoints (native format)")
    parser.add_argument("--tokenizer", required=True, help="the SentencePiece model the data was written with")
    parser.add_argument("--input", required=True, help="held-out fine-tuning JSONL")
    parser.add_argument("--max-new-tokens", type=cli.int_at_least(1), default=32, help="per response")
    parser.add_argument("--show", type=int, default=3, help="print this many examples per checkpoint")
    return parser


def run(args) -> int:
    tokenizer = Tokenizer(args.tokenizer)
    records = [r for n, r in read_jsonl(args.input, "input file") if messages_of(r, f"{args.input}:{n}")]
    for ckpt in args.checkpoint:
        accuracy, results = response_accuracy(load_model(ckpt), tokenizer, records, args.max_new_tokens)
        print(f"{ckpt}: {accuracy:.3f} exact match on {len(records)} held-out instructions")
        for prompt, want, got in results[:args.show]:
            print(f"    {prompt!r} -> {got!r} (expected {want!r})")
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
