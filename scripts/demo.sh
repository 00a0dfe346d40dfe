#!/usr/bin/env bash
# The main job on the built-in demo: build the corpus and tokenizer from Python's standard
# library (once), then train the tiny LLaMA on 4 local processes (tp=2 x pp=2, sp) with torchrun.
# Extra arguments go to `python -m llama.train` (and win over these).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" tools/build_demo_corpus.py --out data/demo
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
exec "$VENV/bin/torchrun" --standalone --nproc-per-node 4 -m llama.train --config configs/tiny.yaml \
  --tp 2 --pp 2 --sp "$@"
