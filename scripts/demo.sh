#!/usr/bin/env bash
# The main job on the built-in demo. Extra arguments go to `python -m llama.train`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m llama.train --config configs/tiny.yaml "$@"
