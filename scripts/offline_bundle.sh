#!/usr/bin/env bash
# Pack what diffboost-bench needs on a GPU machine without network access, to travel beside a copy of
# this repository: ComfyUI's tree, and the wheels such a machine usually lacks for ComfyUI v0.8.0
# when it already has torch, transformers, safetensors, aiohttp, scipy and tqdm.
#
#   COMFYUI_PATH=~/ComfyUI scripts/offline_bundle.sh [PYTHON_VERSION (3.12)] [OUT (.gpu)]
#
# Writes three archives, each small enough to carry on its own:
#   OUT/comfy.tar.xz    the ComfyUI tree (unpacks to ComfyUI/)
#   OUT/base.tar.xz     the wheels, installed, without comfy_kitchen
#   OUT/kitchen.tar.xz  comfy_kitchen (ComfyUI's native FP8 and RoPE kernels), without its AMD backend
# On the GPU machine, from the repository copy (kitchen only for the comfy-fp8 peer and Flux's eager RoPE):
#   mkdir -p /tmp/site /tmp/pk && tar -C /tmp/site -xJf OUT/base.tar.xz && tar -C /tmp -xJf OUT/comfy.tar.xz
#   ln -sfn "$PWD" /tmp/pk/diffboost
#   PYTHONPATH=/tmp/pk:/tmp/site COMFYUI_PATH=/tmp/ComfyUI python -m diffboost.bench ...
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
comfy=${COMFYUI_PATH:-$HOME/ComfyUI}
python_version=${1:-3.12}
out=$(realpath -m "${2:-$here/.gpu}")
[ -f "$comfy/comfyui_version.py" ] || { echo "No ComfyUI at $comfy: set COMFYUI_PATH to its folder." >&2; exit 1; }

# ComfyUI's requirements missing there (av, pydantic and friends), torchsde for its samplers, comfy_kitchen.
wheels=(torchsde==0.2.6 trampoline==0.1.2 av==18.1.0 pydantic==2.14.4 pydantic-core==2.50.5
        pydantic-settings==2.16.3 annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4
        "$(grep -i '^comfy-kitchen' "$comfy/requirements.txt")")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$work/wheels" "${wheels[@]}"
python3 -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version "$python_version" \
  --target "$work/site" "$work"/wheels/*.whl
mkdir -p "$work/kitchen" "$out"
mv "$work"/site/comfy_kitchen* "$work/kitchen/"
rm -rf "$work/kitchen/comfy_kitchen/backends/hip"  # AMD only: half the wheel
tar -C "$work/site" -cJf "$out/base.tar.xz" .
tar -C "$work/kitchen" -cJf "$out/kitchen.tar.xz" .
tar -C "$(dirname "$comfy")" -cJf "$out/comfy.tar.xz" --exclude=__pycache__ \
  --transform "s,^$(basename "$comfy"),ComfyUI," "$(basename "$comfy")"
ls -l "$out"/*.tar.xz
