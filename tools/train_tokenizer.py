#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer with the LLaMA paper's options (numbers split into
digits, byte fallback for unknown UTF-8) on text files or JSONL.

    python tools/train_tokenizer.py --input a.jsonl b.txt --model-prefix out/tokenizer --vocab-size 32000
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.preprocess import iter_documents  # noqa: E402
from llama.tokenizer import train_tokenizer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl (one document per line) or text files")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--model-prefix", required=True)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = train_tokenizer(iter_documents(args.input, args.json_key), args.model_prefix, args.vocab_size, args.threads)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
