#!/usr/bin/env bash
# The main job on the built-in demo, end to end (about 6 minutes on 2 CPU cores):
#   1. build the corpus (stdlib docstrings + sources), train the tokenizer, write the shards
#   2. train the tiny LLaMA on 4 processes (tp=2 x pp=2, sequence parallel, gloo) with torchrun,
#      saving a checkpoint and the metrics
#   3. convert the checkpoint to Hugging Face's format with its tokenizer (tokenizer.json: loads
#      in transformers and lm-evaluation-harness as it is), and measure perplexity on held-out
#      prose from that conversion
#   4. plot the loss curve, and print samples generated with the KV cache
# Extra arguments go to the training command (e.g. --steps 50).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT=runs/demo
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
"$PY" tools/build_demo_corpus.py --out data/demo
rm -rf "$OUT" && mkdir -p "$OUT"
"$VENV/bin/torchrun" --standalone --nproc-per-node 4 -m llama.train --config configs/tiny.yaml \
  --tp 2 --pp 2 --sp --save "$OUT/ckpt" --metrics "$OUT/metrics.jsonl" "$@"
"$VENV/bin/llama-convert" --from native --to hf --input "$OUT/ckpt" --output "$OUT/hf" \
  --tokenizer data/demo/tokenizer.model
echo "perplexity on held-out docstrings (the Hugging Face export, converted back on the fly):"
"$VENV/bin/llama-eval" --checkpoint "$OUT/hf" --format hf --perplexity data/demo/prose-valid --seq-len 128 \
  --max-windows 64
"$PY" tools/plot_metrics.py "$OUT/metrics.jsonl" --out "$OUT/loss.png" --title "tiny LLaMA, tp=2 x pp=2"
echo "samples (greedy, then temperature 0.8 / top-p 0.9):"
"$VENV/bin/llama-generate" --checkpoint "$OUT/ckpt" --tokenizer data/demo/tokenizer.model \
  --prompt "Return the number of" --prompt "def __init__(self" --max-new-tokens 40
"$VENV/bin/llama-generate" --checkpoint "$OUT/ckpt" --tokenizer data/demo/tokenizer.model \
  --prompt "This module provides" --max-new-tokens 40 --temperature 0.8 --top-p 0.9
echo "done: $OUT/ckpt (checkpoint), $OUT/hf (Hugging Face), $OUT/metrics.jsonl, $OUT/loss.png"
