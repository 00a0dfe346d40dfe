#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer with the LLaMA paper's options (numbers split into
digits, byte fallback for unknown UTF-8) on text files or JSONL.

    python tools/train_tokenizer.py --input a.jsonl b.txt --model-prefix out/tokenizer --vocab-size 32000
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import cli  # noqa: E402
from llama.preprocess import add_input_arguments, documents  # noqa: E402
from llama.tokenizer import train_tokenizer  # noqa: E402


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog=Path(__file__).name, description=__doc__)
    add_input_arguments(parser)
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model")
    parser.add_argument("--vocab-size", type=cli.int_at_least(1), default=32000, help="tokens in the vocabulary")
    parser.add_argument("--threads", type=cli.int_at_least(1), default=2, help="SentencePiece's trainer threads")
    return parser


def run(args) -> int:
    path = train_tokenizer(documents(args.input, args.json_key), args.model_prefix, args.vocab_size, args.threads)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
