#!/usr/bin/env python
"""Build the demo corpus from what ships with Python: standard-library docstrings (prose) and
standard-library source files (code), a SentencePiece tokenizer trained on both, and their
token shards. Skips the work when OUT already holds a complete build.

    python tools/build_demo_corpus.py --out data/demo [--vocab-size 4096]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import cli  # noqa: E402
from llama.demo_corpus import build_demo  # noqa: E402


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog=Path(__file__).name, description=__doc__)
    parser.add_argument("--out", default="data/demo", help="the folder to build in")
    parser.add_argument("--vocab-size", type=cli.int_at_least(1), default=4096, help="the tokenizer's vocabulary")
    parser.add_argument("--max-mb", type=float, default=2.0, help="megabytes of text per source (> 0)")
    parser.add_argument("--workers", type=cli.int_at_least(1), default=2, help="tokenising processes")
    parser.add_argument("--force", action="store_true", help="rebuild even when complete")
    return parser


def _built_options(done: Path):
    """The options of the complete build in OUT, if any (an unreadable record: none)."""
    try:
        return json.loads(done.read_text()).get("options")
    except (OSError, ValueError, AttributeError):
        return None


def run(args) -> int:
    if not args.max_mb > 0:
        raise ValueError(f"--max-mb {args.max_mb} must be > 0")
    done = Path(args.out) / "BUILD.json"
    want = {"vocab_size": args.vocab_size, "max_mb": args.max_mb, "python": sys.version.split()[0], "layout": 3}
    if not args.force and _built_options(done) == want:
        print(f"demo corpus already built in {args.out}")
        return 0
    stats = build_demo(args.out, args.vocab_size, int(args.max_mb * 1e6), args.workers)
    for name in ("prose", "code", "prose-valid"):
        s = stats[name]
        print(f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['mb_per_s']:.1f} MB/s")
    done.write_text(json.dumps({"options": want, "stats": stats}, indent=1))
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
