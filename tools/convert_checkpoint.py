#!/usr/bin/env python
"""Convert a LLaMA checkpoint between formats (also the console script `llama-convert`).

    python tools/convert_checkpoint.py --from meta --to hf --input llama-7b/ --output llama-7b-hf/
    python tools/convert_checkpoint.py --from hf --to native --input llama-7b-hf/ --output ckpt/
    python tools/convert_checkpoint.py --from native --to meta --input ckpt/ --output meta/ --tp 2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.convert_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
