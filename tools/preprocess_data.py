#!/usr/bin/env python
"""Tokenise text files or JSONL into one token shard (PREFIX.bin + PREFIX.idx), EOS after each
document, with worker processes; the shard appears under its name only when complete.

    python tools/preprocess_data.py --input docs.jsonl --json-key text --tokenizer tok.model \\
        --output-prefix data/mine --workers 4
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.preprocess import preprocess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizer", required=True, help="a SentencePiece .model (Meta's tokenizer.model works)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    s = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key, args.workers)
    print(f"{s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s: "
          f"{s['mb_per_s']:.2f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
