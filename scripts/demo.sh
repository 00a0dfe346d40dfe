#!/usr/bin/env bash
# The main job on the built-in demo: build the corpus and tokenizer from Python's standard
# library (once), then train the tiny LLaMA on 4 local processes (tp=2 x pp=2, sp).
# Extra arguments go to `python -m llama.train` (and win over these).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" tools/build_demo_corpus.py --out data/demo
exec "$PY" -m llama.train --config configs/tiny.yaml --nproc 4 --tp 2 --pp 2 --sp "$@"
