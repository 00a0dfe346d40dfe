#!/usr/bin/env python
"""Tokenise text files or JSONL into one token shard (PREFIX.bin + PREFIX.idx), EOS after each
document, with worker processes; the shard appears under its name only when complete.

    python tools/preprocess_data.py --input docs.jsonl --json-key text --tokenizer tok.model \\
        --output-prefix data/mine --workers 4
    python tools/preprocess_data.py --format sft --input instructions.jsonl --tokenizer tok.model \
        --output-prefix data/sft/train      # fine-tuning records: also PREFIX.mask (llama/sft.py)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import cli  # noqa: E402
from llama.preprocess import FORMATS, add_input_arguments, preprocess  # noqa: E402


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog=Path(__file__).name, description=__doc__)
    add_input_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="a SentencePiece .model (Meta's tokenizer.model works)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text: documents (--json-key); sft: fine-tuning JSONL of prompt/response or messages "
                             "records, rendered by llama/sft.py's template, with a loss mask (PREFIX.mask)")
    parser.add_argument("--workers", type=cli.int_at_least(1), default=2, help="tokenising processes")
    return parser


def run(args) -> int:
    s = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key, args.workers, fmt=args.format)
    trained = f" ({s['trained_tokens']:,} trained)" if args.format == "sft" else ""
    print(f"{s['documents']:,} documents, {s['tokens']:,} tokens{trained}, {s['bytes'] / 1e6:.1f} MB in "
          f"{s['seconds']:.1f} s: "
          f"{s['mb_per_s']:.2f} MB/s")
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
