"""`llama-convert`: convert a LLaMA checkpoint between formats, one tensor at a time.

Formats: `native` (this library's layout-free checkpoints: a directory with meta.json, or a root
whose `latest` names one), `meta` (Meta's params.json + consolidated.NN.pth, one file per tp
shard) and `hf` (Hugging Face's config.json + model*.safetensors). Every tensor is checked
against the shape the config implies. `--to hf --tokenizer tokenizer.model` writes Hugging Face's
tokenizer files beside the weights (tokenizer.json, tokenizer_config.json: `<s>` added), so
that AutoTokenizer, pipelines and lm-evaluation-harness load the export unchanged."""
from __future__ import annotations

import sys
import time

from llama import cli
from llama.convert import CHECKPOINT_ERRORS, FORMATS, HF_MAX_SHARD_BYTES, convert

EXAMPLES = """examples:
  llama-convert --from meta --to native --input LLaMA/7B --output ckpt/llama-7b   # then llama-train --init-from
  llama-convert --from hf --to native --input llama-7b-hf --output ckpt/llama-7b
  llama-convert --from native --to hf --input runs/ckpt --output my-model-hf      # follows runs/ckpt/latest
  llama-convert --from native --to hf --input runs/ckpt --output my-model-hf --tokenizer data/demo/tokenizer.model
  llama-convert --from hf --to meta --input llama-7b-hf --output LLaMA-7B-tp2 --tp 2
"""


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog="llama-convert", description=__doc__, epilog=EXAMPLES)
    parser.add_argument("--from", dest="src_fmt", choices=FORMATS, required=True, help="the input's format")
    parser.add_argument("--to", dest="dst_fmt", choices=FORMATS, required=True, help="the output's format")
    parser.add_argument("--input", required=True, help="the checkpoint to read (a directory)")
    parser.add_argument("--output", required=True, help="the directory to write (created if missing)")
    parser.add_argument("--tp", type=cli.int_at_least(1), default=1, help="shards to write for --to meta")
    parser.add_argument("--max-seq-len", type=cli.int_at_least(1), default=2048,
                        help="context length to record (Meta's params.json has none)")
    parser.add_argument("--max-shard-size", type=cli.byte_size, default=HF_MAX_SHARD_BYTES,
                        help="--to hf: the most bytes per model-NNNNN-of-NNNNN.safetensors file (5GB = 5e9 bytes, "
                             "as transformers counts; 5GiB = 5·2^30); one model.safetensors when all fits")
    parser.add_argument("--tokenizer", metavar="MODEL",
                        help="--to hf: the SentencePiece model, written beside the weights as tokenizer.json, "
                             "tokenizer_config.json (adds <s>), special_tokens_map.json and tokenizer.model "
                             "(default: no tokenizer files)")
    return parser


def run(args) -> int:
    start = time.perf_counter()
    info = convert(args.src_fmt, args.input, args.dst_fmt, args.output, args.tp, args.max_seq_len,
                   args.max_shard_size, args.tokenizer)
    cfg = info["config"]
    print(f"converted {args.src_fmt} → {args.dst_fmt}: dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} "
          f"vocab={cfg.vocab_size}, {cfg.num_params():,} parameters in {time.perf_counter() - start:.1f} s; "
          f"peak memory {info['peak_rss_bytes'] / 2**20:.0f} MiB (largest tensor "
          f"{info['largest_tensor_elements'] * 4 / 2**20:.1f} MiB in fp32)")
    if args.tokenizer:
        print(f"tokenizer: {args.output}/tokenizer.json, tokenizer_config.json (adds <s>), tokenizer.model")
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), run, argv, errors=CHECKPOINT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
