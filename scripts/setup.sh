#!/usr/bin/env bash
# Make the development environment: a virtual environment with torch, ComfyUI's requirements and
# the pack installed editable. Safe to run again; it only adds what is missing.
#
#   scripts/setup.sh            (venv in .venv; DIFFBOOST_VENV=PATH to put it elsewhere)
#
# ComfyUI itself is found through COMFYUI_PATH (default $HOME/ComfyUI), or as the ComfyUI whose
# custom_nodes folder holds this pack.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${DIFFBOOST_VENV:-$here/.venv}
python=${PYTHON:-python3}
torch_spec=${DIFFBOOST_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

comfy=${COMFYUI_PATH:-}
if [ -z "$comfy" ]; then
  if [ -f "$here/../../comfy/model_detection.py" ]; then comfy=$(cd "$here/../.." && pwd); else comfy=$HOME/ComfyUI; fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first, pinned, so that ComfyUI's unpinned "torch" below installs nothing more.
"$venv/bin/python" -c "import torch, torchvision" 2>/dev/null || pip install $torch_spec

if [ -f "$comfy/requirements.txt" ]; then
  # torchaudio: no release fits these torch versions and only ComfyUI's audio nodes use it.
  # requests: imported by ComfyUI's app/frontend_management.py but not in its list.
  grep -v -i -E '^(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$venv/comfy-requirements.txt"
  echo requests >> "$venv/comfy-requirements.txt"
  pip install -q -r "$venv/comfy-requirements.txt"
else
  echo "WARNING: no ComfyUI found at $comfy (set COMFYUI_PATH); the host tests will be skipped." >&2
fi
pip install -q -e "$here[test]"

# The browser test drives Debian's Chromium through playwright-core (npm); without them it skips loudly.
# Only what is missing: a NodeSource nodejs ships its own npm and conflicts with Debian's npm package.
missing=""
command -v chromium >/dev/null || missing=" chromium"  # each name after a space, as the messages print it
command -v npm >/dev/null || missing="$missing nodejs npm"
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086 # one word per package
    apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null \
      || echo "WARNING: could not install$missing; the browser test will be skipped." >&2
  else
    echo "WARNING: missing$missing (install them to run the browser test)." >&2
  fi
fi
tools=${DIFFBOOST_PLAYWRIGHT_DIR:-$HOME/.cache/diffboost/browser-tools}
if command -v npm >/dev/null && [ ! -d "$tools/node_modules/playwright-core" ]; then
  npm install -q --prefix "$tools" --no-audit --no-fund playwright-core@1.65.1 >/dev/null \
    || echo "WARNING: could not install playwright-core; the browser test will be skipped." >&2
fi
echo "diffboost development environment ready: $venv (ComfyUI: $comfy)"
