"""FLOPs of a denoiser call, counted once per model and input shape, and the GPU's peak.

Counting runs the call once under `torch.utils.flop_counter.FlopCounterMode` (matrix multiplies,
convolutions and attention; elementwise work is not counted, as is usual for achieved TFLOP/s)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch

# bf16 dense matmul peak in TFLOP/s, matched against torch.cuda.get_device_name() (first match wins).
# "measured": timed on that GPU by this project; "datasheet": the vendor's dense (no sparsity) figure.
GPU_PEAK_TFLOPS: list[tuple[str, float, str]] = [
    ("H200", 790.0, "measured bf16 matmul on an H200"),
    ("H100", 798.0, "measured bf16 matmul on an H100 SXM (80GB HBM3)"),
    ("GH200", 989.0, "datasheet dense bf16"),
    ("B200", 2250.0, "datasheet dense bf16"),
    ("A100", 312.0, "datasheet dense bf16"),
    ("L40S", 362.0, "datasheet dense bf16"),
    ("L40", 181.0, "datasheet dense bf16"),
    ("L4", 121.0, "datasheet dense bf16"),
    ("A10", 125.0, "datasheet dense bf16"),
    ("RTX 4090", 165.0, "datasheet dense bf16, fp32 accumulate"),
    ("RTX 3090", 71.0, "datasheet dense bf16, fp32 accumulate"),
]


def gpu_peak_tflops(device: torch.device | str | None) -> tuple[float | None, str]:
    """(peak bf16 TFLOP/s, where the figure comes from) for `device`; (None, reason) when unknown
    or not a GPU. FP8 matmuls can reach about twice this figure on GPUs that have them."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, f"no peak for device type '{device.type}'"
    name = torch.cuda.get_device_name(device)
    for key, peak, source in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak, f"{name}: {source}"
    return None, f"{name}: not in diffboost's peak table (measure/flops.py)"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn()`, run without autograd."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class FlopCache:
    """FLOPs per (model, input shape). Models are held weakly, so the cache never keeps one alive."""

    def __init__(self):
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: object, shape_key: Hashable) -> int | None:
        return self._by_model.get(model, {}).get(shape_key)

    def get_or_count(self, model: object, shape_key: Hashable, fn: Callable[[], object]) -> int:
        """The cached count, or count `fn()` once and remember it."""
        per_shape = self._by_model.setdefault(model, {})
        if shape_key not in per_shape:
            per_shape[shape_key] = count_flops(fn)
        return per_shape[shape_key]

    def clear(self) -> None:
        self._by_model = weakref.WeakKeyDictionary()


FLOPS = FlopCache()  # one per process: the node and the CLI share it
