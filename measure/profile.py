"""Where a sampling run's time goes: the device's kernels, grouped into matrix multiplies,
attention, convolutions, fused element-wise kernels, copies and the rest, and the time the device
sat idle between them (launch and Python overhead), per sampling step.

On a GPU the kernels are CUDA activity from torch.profiler (kernels replayed inside CUDA graphs
included where the CUDA driver reports them); on a CPU they are the aten operators and inductor's
generated C++ kernels, each counted by its own (self) time so nothing is counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FUSED = "fused element-wise (compiled)"

# (category, substrings of kernel or operator names, lower case); the first match wins. inductor's
# generated point-wise and reduction kernels first: it names a kernel after every op it fused, so the
# RMSNorm-and-RoPE kernel that writes cuDNN attention's inputs is
# "triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_...". Attention next: its
# kernels' names also hold "gemm"; cuDNN's convolution kernels hold "conv" and "gemm". inductor's
# templates ("triton_tem_") fall to the attention, convolution or matmul they were generated for.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (FUSED, ("triton_poi_", "triton_red_", "triton_per_")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "softmax")),
    ("convolution", ("conv", "implicit_gemm", "winograd", "fprop", "dgrad", "wgrad")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "sm80_xmma", "scaled_mm", "aten::mm",
                "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "mkldnn_linear", "aten::linear",
                "triton_tem_")),
    (FUSED, ("triton_", "cpp_fused", "kernel_cpp")),
    ("copy / cast / fill", ("memcpy", "memset", "copy", "aten::to", "aten::_to_copy", "cat", "fill", "zero")),
)
OTHER = "other"
TOP_KERNELS = 25


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lowered for k in keys):
            return label
    return OTHER


@dataclass
class StepProfile:
    """Kernel time of a profiled run, in milliseconds per sampling step."""

    steps: int
    wall_ms: float  # the whole run, divided by steps
    busy_ms: float  # time the device ran at least one kernel (overlaps merged)
    by_category: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, float] = field(default_factory=dict)  # category -> kernels launched per step
    top: list[tuple[str, str, float, float]] = field(default_factory=list)  # (name, category, ms, calls) per step
    device: str = "cpu"
    note: str = ""  # what the figures cannot show on this device, if anything

    @property
    def idle_ms(self) -> float:
        return max(self.wall_ms - self.busy_ms, 0.0)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "device": self.device, "note": self.note,
                "wall_ms_per_step": round(self.wall_ms, 3),
                "busy_ms_per_step": round(self.busy_ms, 3), "idle_ms_per_step": round(self.idle_ms, 3),
                "by_category_ms_per_step": {k: round(v, 3) for k, v in self.by_category.items()},
                "kernels_per_step": {k: round(v, 1) for k, v in self.kernels.items()},
                "top_kernels": [{"name": n[:160], "category": c, "ms_per_step": round(ms, 4),
                                 "calls_per_step": round(calls, 2)} for n, c, ms, calls in self.top]}

    def table(self) -> str:
        """A markdown table: each category's time per step and its share of the wall time."""
        lines = ["| where | ms per step | share | kernels per step |", "|---|---|---|---|"]
        for label, ms in sorted(self.by_category.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {label} | {ms:.2f} | {ms / self.wall_ms:.0%} | {self.kernels.get(label, 0):.0f} |")
        idle = ("device idle (launch and Python overhead)" if self.device.startswith("cuda")
                else "outside recorded operators (Python; inductor's C++ kernels are not recorded on a CPU)")
        lines.append(f"| {idle} | {self.idle_ms:.2f} | {self.idle_ms / self.wall_ms:.0%} | |")
        lines.append(f"| **wall** | **{self.wall_ms:.2f}** | 100% | |")
        if self.note:
            lines.append(f"\n{self.note}")
        return "\n".join(lines)


def profile_run(run: Callable[[], object], steps: int, device: torch.device | str,
                trace_path: str | None = None) -> StepProfile:
    """Run `run()` (a sampling run of `steps` steps) once under torch.profiler and summarise it;
    with `trace_path` (ending .json or .json.gz) also write the whole timeline for chrome://tracing
    or Perfetto."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        _sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    if trace_path:
        prof.export_chrome_trace(trace_path)  # torch gzips it when the name ends in .gz
    events = _device_events(prof.events(), on_gpu)
    summary = summarise(events, wall_us, steps, str(device))
    if on_gpu and not events:
        summary.note = ("The profiler reported no kernels: this driver does not show kernels replayed inside "
                        "CUDA graphs. Profile the same mode without cudagraphs to see them.")
    return summary


def summarise(events: list[tuple[str, float, float, float]], wall_us: float, steps: int,
              device: str = "cpu") -> StepProfile:
    """events: (name, start_us, end_us, self_us) of each kernel; busy time merges overlapping intervals."""
    steps = max(steps, 1)
    totals: dict[str, list[float]] = {}  # name -> [self us, calls]
    intervals = []
    for name, start, end, self_us in events:
        t = totals.setdefault(name, [0.0, 0.0])
        t[0] += self_us
        t[1] += 1
        intervals.append((start, end))
    by_category: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for name, (us, calls) in totals.items():
        label = category(name)
        by_category[label] = by_category.get(label, 0.0) + us / 1000 / steps
        kernels[label] = kernels.get(label, 0.0) + calls / steps
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    busy_us = _merged_length(intervals)
    return StepProfile(steps=steps, wall_ms=wall_us / 1000 / steps, busy_ms=min(busy_us, wall_us) / 1000 / steps,
                       by_category=by_category, kernels=kernels, device=device,
                       top=[(n, category(n), us / 1000 / steps, calls / steps) for n, (us, calls) in top])


def _device_events(events, on_gpu: bool) -> list[tuple[str, float, float, float]]:
    from torch.autograd import DeviceType

    rows = []
    for e in events:
        if on_gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            span = e.time_range
            rows.append((e.name, span.start, span.end, span.elapsed_us()))
        elif e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0 and _is_compute(e.name):
            span = e.time_range
            rows.append((e.name, span.start, span.end, e.self_cpu_time_total))
    return rows


def _is_compute(name: str) -> bool:
    # On a CPU the profiler also records Python-level regions (compiled-region markers, ComfyUI's
    # record_function blocks): their self time is overhead, not a kernel.
    return name.startswith("aten::") or "cpp_fused" in name or "kernel_cpp" in name or name.startswith("mkldnn")


def _merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals, overlaps counted once."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
