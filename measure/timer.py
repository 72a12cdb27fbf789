"""Per-step timing of a sampling run, on the device's own clock.

On CUDA each mark is an event recorded on the current stream, so step times are what the GPU
spent, not when the Python callback happened to run; on other devices marks are perf_counter
readings (the CPU runs the work synchronously, so wall time is device time there)."""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Feed it `start()` when the sampler starts stepping (before the first denoiser call) and `step()` from the
    sampler's per-step callback; read `step_seconds()` once the run is over."""

    def __init__(self, device: torch.device | str | None = None):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.uses_cuda_events = device.type == "cuda" and torch.cuda.is_available()
        self._marks: list = []

    def reset(self) -> None:
        self._marks = []

    @property
    def started(self) -> bool:
        return bool(self._marks)

    def _mark(self):
        if self.uses_cuda_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Mark the start of step 0. Only the first call of a run counts."""
        if not self._marks:
            self._marks.append(self._mark())

    def step(self) -> None:
        """Mark the end of one sampling step (call from the per-step callback)."""
        if not self._marks:  # no start seen (a sampler that never called the model): time from here
            self._marks.append(self._mark())
            return
        self._marks.append(self._mark())

    def step_seconds(self) -> list[float]:
        """Duration of each step, in order. Synchronizes with the device when it uses CUDA events."""
        if len(self._marks) < 2:
            return []
        if self.uses_cuda_events:
            self._marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self._marks, self._marks[1:], strict=False)]
        return [b - a for a, b in zip(self._marks, self._marks[1:], strict=False)]


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device to finish queued work, so that wall-clock readings include it."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
    elif device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()
