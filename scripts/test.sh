#!/usr/bin/env bash
# Lint, then the whole test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$VENV/bin/ruff" check .
exec "$PY" -m pytest "$@"
