"""Where FP8 matrix multiplies can run: FP8 tensor cores need an NVIDIA GPU of compute capability 8.9
or newer (Ada, Hopper, Blackwell) and `torch._scaled_mm`. Everything else gets a clear error, or the
slow reference path when the user asked for it."""

from __future__ import annotations

import torch

from ..backends.errors import DiffBoostError
from .config import LABELS, NEEDS_FP8_MATMUL

MIN_CAPABILITY = (8, 9)


class Fp8Unavailable(DiffBoostError):
    """The chosen FP8 type needs FP8 tensor cores that this device does not have."""


def fp8_matmul_missing(device: torch.device | str) -> str | None:
    """Why FP8 matmuls cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    if device.type != "cuda":
        return f"the model runs on {device.type}, which has no FP8 tensor cores"
    if torch.version.hip is not None:
        return "ROCm GPUs use another FP8 format (e4m3fnuz), which diffboost does not support yet"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"{name} (compute capability {capability[0]}.{capability[1]}) has no FP8 tensor cores; they "
                f"need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)")
    return None


def choose_kernel(quant_type: str, device: torch.device | str, allow_reference_path: bool) -> str:
    """How an Fp8Linear of `quant_type` multiplies on `device`: 'scaled_mm' (FP8 tensor cores),
    'reference' (dequantize, then multiply in the compute dtype) or 'weight_only'.
    Raises Fp8Unavailable when FP8 matmuls are needed, missing, and the reference path was not allowed."""
    if quant_type not in NEEDS_FP8_MATMUL:
        return "weight_only"
    missing = fp8_matmul_missing(device)
    if missing is None:
        return "scaled_mm"
    if allow_reference_path:
        return "reference"
    raise Fp8Unavailable(
        f"'{LABELS[quant_type]}' multiplies in FP8, but {missing}. Choose '{LABELS['weight_only']}' (any GPU; "
        "saves no time), or turn on allow_reference_path to run the slow reference path (for testing only).")
