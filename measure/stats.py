"""What a benchmark measured: one RunStats per sampling run, BenchmarkStats over all of them with
medians and spread, a JSON-able dict, and plain-text tables."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .compile_phases import describe as describe_compile

SCHEMA = "diffboost.stats/1"
FIRST_CALL, WARM_UP, TIMED = "first call", "warm-up", "timed"


@dataclass
class RunStats:
    """One sampling run. `seconds` is end-to-end (device synchronized); `step_seconds` come from
    device timing from the start of stepping to each step's callback."""

    index: int
    kind: str
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None
    dynamo_graphs: int = 0  # graphs torch.dynamo captured during this run (any compiler)
    diffboost_graphs: int | None = None  # graphs diffboost's CompiledModule compiled; None: not diffboost-compiled
    flops: int | None = None  # denoiser FLOPs of the whole run
    compile_phases: dict | None = None  # first call only: measure.compile_phases.between(...)

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    @property
    def device_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def it_per_s(self) -> float | None:
        return self.steps / self.device_seconds if self.steps and self.device_seconds > 0 else None

    @property
    def tflops(self) -> float | None:
        if self.flops is None or not self.device_seconds:
            return None
        return self.flops / self.device_seconds / 1e12

    @property
    def graphs(self) -> int:
        """Graphs compiled during the run: diffboost's own count when it compiled the model."""
        return self.diffboost_graphs if self.diffboost_graphs is not None else self.dynamo_graphs

    def as_dict(self) -> dict:
        return {"index": self.index, "kind": self.kind, "seconds": _round(self.seconds, 4),
                "steps": self.steps, "it_per_s": _round(self.it_per_s, 4),
                "step_ms": [_round(s * 1000, 3) for s in self.step_seconds],
                "peak_mem_bytes": self.peak_mem_bytes, "dynamo_graphs": self.dynamo_graphs,
                "diffboost_graphs": self.diffboost_graphs, "tflops": _round(self.tflops, 3)}


@dataclass
class Spread:
    median: float
    min: float
    max: float
    stdev: float

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return None
        stdev = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.median(values), min(values), max(values), stdev)

    def as_dict(self, digits: int = 4) -> dict:
        return {"median": _round(self.median, digits), "min": _round(self.min, digits),
                "max": _round(self.max, digits), "stdev": _round(self.stdev, digits)}


@dataclass
class BenchmarkStats:
    steps: int
    warmup_runs: int
    timed_runs: int
    device: str
    device_name: str = ""
    model_state: str = ""
    runs: list[RunStats] = field(default_factory=list)
    peak_tflops: float | None = None
    peak_tflops_source: str = ""
    peak_mem_source: str = ""
    process_peak_rss_bytes: int | None = None
    status: str = "running"
    setup: dict = field(default_factory=dict)  # what was sampled (sampler, shape, ...), for the reader

    @property
    def first_call(self) -> RunStats | None:
        return self.runs[0] if self.runs else None

    @property
    def timed(self) -> list[RunStats]:
        return [r for r in self.runs if r.kind == TIMED or (r.kind == FIRST_CALL and self.warmup_runs == 0)]

    def spread(self, metric: str) -> Spread | None:
        getters = {"it_per_s": lambda r: r.it_per_s, "run_s": lambda r: r.seconds,
                   "step_ms": None, "tflops": lambda r: r.tflops}
        if metric == "step_ms":
            return Spread.of([s * 1000 for r in self.timed for s in r.step_seconds])
        return Spread.of([getters[metric](r) for r in self.timed])

    @property
    def recompiles(self) -> int:
        """Graphs compiled in any run after the first call: 0 when the compiled model is reused."""
        return sum(r.graphs for r in self.runs[1:])

    def as_dict(self) -> dict:
        """Every figure as plain JSON values; headline figures are medians over the timed runs."""
        first = self.first_call
        spreads = {m: self.spread(m) for m in ("it_per_s", "run_s", "step_ms", "tflops")}
        median = {m: (s.median if s else None) for m, s in spreads.items()}
        timed = self.timed
        peaks = [r.peak_mem_bytes for r in timed if r.peak_mem_bytes is not None]
        flops = next((r.flops for r in reversed(self.runs) if r.flops is not None), None)
        diffboost = [r.diffboost_graphs for r in self.runs[1:] if r.diffboost_graphs is not None]
        fraction = (median["tflops"] / self.peak_tflops
                    if median["tflops"] is not None and self.peak_tflops else None)
        return {
            "schema": SCHEMA, "status": self.status,
            "device": self.device, "device_name": self.device_name, "model_state": self.model_state,
            "steps": self.steps, "warmup_runs": self.warmup_runs, "timed_runs": self.timed_runs,
            "timed_runs_done": len(timed),
            "it_per_s": _round(median["it_per_s"], 4), "run_s": _round(median["run_s"], 4),
            "step_ms": _round(median["step_ms"], 3), "tflops": _round(median["tflops"], 3),
            "spread": {m: s.as_dict() for m, s in spreads.items() if s is not None},
            "first_call_s": _round(first.seconds, 4) if first else None,
            "first_call_graphs": first.graphs if first else None,
            "first_call_compile": first.compile_phases if first else None,
            "peak_mem_bytes": max(peaks) if peaks else None, "peak_mem_source": self.peak_mem_source,
            "process_peak_rss_bytes": self.process_peak_rss_bytes,
            "recompiles": self.recompiles,
            "recompiles_dynamo": sum(r.dynamo_graphs for r in self.runs[1:]),
            "recompiles_diffboost": sum(diffboost) if diffboost else None,
            "tflop_per_run": _round(flops / 1e12, 6) if flops is not None else None,
            "tflop_per_step": _round(flops / 1e12 / self.steps, 6) if flops is not None and self.steps else None,
            "peak_tflops": self.peak_tflops, "peak_tflops_source": self.peak_tflops_source,
            "fraction_of_peak": _round(fraction, 4),
            "setup": dict(self.setup),
            "runs": [r.as_dict() for r in self.runs],
        }


def format_stats(d: dict) -> str:
    """A short text table of a stats dict (BenchmarkStats.as_dict), for the node and logs."""
    sp = d.get("spread", {})

    def ranged(metric: str, fmt: str) -> str:
        s = sp.get(metric)
        if not s:
            return "-"
        return f"{s['median']:{fmt}} median ({s['min']:{fmt}} - {s['max']:{fmt}}, sd {s['stdev']:{fmt}})"

    tflops = "-"
    if d.get("tflops") is not None:
        tflops = f"{d['tflops']:.2f}"
        if d.get("fraction_of_peak") is not None:
            tflops += f" ({d['fraction_of_peak'] * 100:.1f}% of {d['peak_tflops']:.0f} peak)"
        else:
            tflops += " (no peak known for this device)"
    diffboost = d.get("recompiles_diffboost")
    recompiles = f"{d.get('recompiles')} after the first call (dynamo {d.get('recompiles_dynamo')}"
    recompiles += f", diffboost {diffboost})" if diffboost is not None else ")"
    first = d.get("first_call_s")
    rows = [
        ("status", f"{d.get('status')}: {d.get('timed_runs_done')}/{d.get('timed_runs')} timed runs of "
                   f"{d.get('steps')} steps after {d.get('warmup_runs')} warm-up(s), "
                   f"{d.get('device_name') or d.get('device')}"),
        ("model", d.get("model_state") or "-"),
        ("it/s", ranged("it_per_s", ".3f")),
        ("run time s", ranged("run_s", ".3f")),
        ("step ms", ranged("step_ms", ".2f")),
        ("first call", "-" if first is None else f"{first:.3f} s ({d.get('first_call_graphs')} graph(s) compiled"
                       + (f"; {describe_compile(d['first_call_compile'])})" if d.get("first_call_compile") else ")")),
        ("peak memory", format_bytes(d.get("peak_mem_bytes"))
         + ("" if d.get("peak_mem_bytes") is not None else " (no device counter here)")),
        ("recompiles", recompiles),
        ("TFLOP/s", tflops),
    ]
    return format_table(["measure", "value"], rows)


def format_table(headers: list[str], rows: list[tuple]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows if row[i] is not None) and rows for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if numeric[i] and n else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _round(v, digits):
    if v is None:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return round(float(v), digits)
