#!/usr/bin/env python
"""Build the demo corpus from what ships with Python: standard-library docstrings (prose) and
standard-library source files (code), a SentencePiece tokenizer trained on both, and their
token shards. Skips the work when OUT already holds a complete build.

    python tools/build_demo_corpus.py --out data/demo [--vocab-size 4096]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.demo_corpus import build_demo  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-mb", type=float, default=2.0, help="megabytes of text per source")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rebuild even when complete")
    args = parser.parse_args()
    done = Path(args.out) / "BUILD.json"
    want = {"vocab_size": args.vocab_size, "max_mb": args.max_mb, "python": sys.version.split()[0], "layout": 3}
    if done.is_file() and not args.force and json.loads(done.read_text()).get("options") == want:
        print(f"demo corpus already built in {args.out}")
        return 0
    stats = build_demo(args.out, args.vocab_size, int(args.max_mb * 1e6), args.workers)
    for name in ("prose", "code", "prose-valid"):
        s = stats[name]
        print(f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['mb_per_s']:.1f} MB/s")
    done.write_text(json.dumps({"options": want, "stats": stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
