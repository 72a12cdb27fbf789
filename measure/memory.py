"""Peak memory of a run.

On CUDA: `torch.cuda.max_memory_allocated` after a reset before the run, i.e. the most device
memory torch's allocator held for tensors during that run. Elsewhere there is no per-run device
figure, so `peak_bytes` is None; `process_peak_rss_bytes` reports the process's peak resident
memory since it started (it can never be reset, so it is not a per-run number)."""

from __future__ import annotations

import sys

import torch

CUDA_SOURCE = "torch.cuda.max_memory_allocated, reset before each run"
NO_DEVICE_SOURCE = "none: no per-run device memory counter on this device"


class PeakMemory:
    def __init__(self, device: torch.device | str | None):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.device = device
        self.on_cuda = device.type == "cuda" and torch.cuda.is_available()
        self.source = CUDA_SOURCE if self.on_cuda else NO_DEVICE_SOURCE

    def reset(self) -> None:
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        """Peak device bytes since the last reset, or None where the device has no counter."""
        if self.on_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return None


def process_peak_rss_bytes() -> int | None:
    """The process's peak resident set size since it started (whole process, never reset)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB
