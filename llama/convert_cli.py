"""`llama-convert --from FORMAT --to FORMAT --input PATH --output PATH [--tp N]`."""
from __future__ import annotations

import argparse
import sys
import time

from llama.convert import FORMATS, ConversionError, convert
from parallel.checkpoint import CheckpointError
from parallel.tensor_files import TensorFileError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-convert", description=__doc__)
    parser.add_argument("--from", dest="src_fmt", choices=FORMATS, required=True)
    parser.add_argument("--to", dest="dst_fmt", choices=FORMATS, required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--tp", type=int, default=1, help="shards to write for --to meta")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length to record (meta has none)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        info = convert(args.src_fmt, args.input, args.dst_fmt, args.output, args.tp, args.max_seq_len)
    except (ConversionError, CheckpointError, TensorFileError, ValueError) as err:
        print(f"llama-convert: error: {err}", file=sys.stderr)
        return 2
    cfg = info["config"]
    print(f"converted {args.src_fmt} → {args.dst_fmt}: dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} "
          f"vocab={cfg.vocab_size}, {cfg.num_params():,} parameters in {time.perf_counter() - start:.1f} s; "
          f"peak memory {info['peak_rss_bytes'] / 2**20:.0f} MiB (largest tensor "
          f"{info['largest_tensor_elements'] * 4 / 2**20:.1f} MiB in fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
