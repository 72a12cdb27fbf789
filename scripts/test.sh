#!/usr/bin/env bash
# Run every check: ruff, then the test suite inside the real ComfyUI host.
# Makes the development environment first when it is missing (scripts/setup.sh).
#
#   scripts/test.sh [pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${DIFFBOOST_VENV:-$here/.venv}
if ! "$venv/bin/python" -c "import torch, diffboost, pytest" 2>/dev/null; then
  echo "No development environment at $venv yet: running scripts/setup.sh first." >&2
  "$here/scripts/setup.sh"
fi
cd "$here"
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest "$@"
