#!/usr/bin/env bash
# Instruction fine-tuning on the demo (README, "Instruction fine-tuning"; a few minutes on 2 CPU
# cores): fine-tunes the demo's checkpoint (runs/demo/ckpt: run scripts/demo.sh first) on a
# synthetic instruction set and prints the held-out exact-match accuracy before and after.
#   1. write 8000 training and 200 held-out instructions (tools/make_instructions.py)
#   2. render them with the template into a fine-tuning shard (tokens + loss mask)
#   3. llama-train --init-from runs/demo/ckpt on it (loss on the responses only, examples packed)
#   4. greedy answers of the base and the fine-tuned model to the held-out instructions
# Extra arguments go to the training command (e.g. --steps 100).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
set -e
BASE=runs/demo/ckpt
OUT=runs/sft
if [ ! -f "$BASE/latest" ] && [ ! -f "$BASE/meta.json" ]; then
  echo "no $BASE: run 'bash scripts/demo.sh' first (it trains the base model)" >&2
  exit 1
fi
"$PY" tools/make_instructions.py --out data/sft --train 8000 --test 200
"$PY" tools/preprocess_data.py --format sft --input data/sft/train.jsonl --tokenizer data/demo/tokenizer.model \
  --output-prefix data/sft/train
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -m llama.train --config configs/tiny.yaml --init-from "$BASE" --set 'data.sources=[{path: data/sft/train}]' \
  --lr 1e-3 --set train.warmup_steps=10 --steps 200 --save "$OUT/ckpt" --metrics "$OUT/metrics.jsonl" --no-progress "$@"
"$PY" tools/eval_instructions.py --checkpoint "$BASE" "$OUT/ckpt" --tokenizer data/demo/tokenizer.model \
  --input data/sft/test.jsonl --max-new-tokens 16
