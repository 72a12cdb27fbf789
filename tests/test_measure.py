"""measure/: timing, statistics, FLOPs, memory and comparison, without ComfyUI."""

from __future__ import annotations

import math
import time

import pytest
import torch

from diffboost.measure import compare, flops, memory
from diffboost.measure.runner import Reporter, run_benchmark
from diffboost.measure.stats import FIRST_CALL, TIMED, WARM_UP, BenchmarkStats, RunStats, Spread, format_stats
from diffboost.measure.timer import StepTimer


def test_step_timer_measures_each_step_on_cpu():
    timer = StepTimer("cpu")
    timer.start()
    for _ in range(3):
        time.sleep(0.02)
        timer.step()
    steps = timer.step_seconds()
    assert len(steps) == 3
    assert all(0.015 < s < 0.5 for s in steps)
    timer.start()  # a second start in the same run changes nothing
    assert len(timer.step_seconds()) == 3
    timer.reset()
    assert timer.step_seconds() == []


def test_spread_median_min_max():
    s = Spread.of([3.0, 1.0, 2.0, float("nan"), None])
    assert (s.median, s.min, s.max) == (2.0, 1.0, 3.0)
    assert s.stdev == pytest.approx(1.0)
    assert Spread.of([]) is None


def _stats(warmup=1) -> BenchmarkStats:
    st = BenchmarkStats(steps=4, warmup_runs=warmup, timed_runs=2, device="cpu", model_state="eager")
    st.runs = [RunStats(0, FIRST_CALL, 5.0, [1.0] * 4, dynamo_graphs=3, diffboost_graphs=2, flops=8_000_000_000_000),
               RunStats(1, TIMED, 0.5, [0.1] * 4, dynamo_graphs=0, diffboost_graphs=1, flops=8_000_000_000_000),
               RunStats(2, TIMED, 0.7, [0.15] * 4, dynamo_graphs=1, diffboost_graphs=0, flops=8_000_000_000_000)]
    st.status = "done"
    return st


def test_benchmark_stats_dict_is_consistent():
    d = _stats().as_dict()
    for key in ("it_per_s", "run_s", "step_ms", "tflops", "first_call_s", "first_call_graphs", "peak_mem_bytes",
                "recompiles", "recompiles_dynamo", "recompiles_diffboost", "tflop_per_step", "fraction_of_peak",
                "spread", "runs", "model_state", "schema"):
        assert key in d
    assert d["it_per_s"] == pytest.approx((10 + 4 / 0.6) / 2, rel=1e-3)  # median of the two timed runs
    assert d["first_call_s"] == 5.0 and d["first_call_graphs"] == 2  # diffboost's own count when it compiled
    assert d["recompiles"] == 1 and d["recompiles_diffboost"] == 1 and d["recompiles_dynamo"] == 1
    assert d["tflop_per_step"] == pytest.approx(2.0)
    assert d["tflops"] == pytest.approx((8 / 0.4 + 8 / 0.6) / 2, rel=1e-3)
    assert d["timed_runs_done"] == 2 and len(d["runs"]) == 3
    text = format_stats(d)
    assert "it/s" in text and "first call" in text and "recompiles" in text


def test_without_warmup_the_first_call_is_a_timed_run():
    assert len(_stats(warmup=0).timed) == 3


def test_compare_relative_error_and_cosine():
    x = torch.randn(2, 4, 8, 8)
    assert compare.relative_error(x, x) == 0.0
    assert compare.cosine_similarity(x, x) == pytest.approx(1.0)
    assert compare.relative_error(x * 1.1, x) == pytest.approx(0.1, rel=1e-6)
    assert compare.cosine_similarity(-x, x) == pytest.approx(-1.0)
    y = x.clone()
    y[0, 0, 0, 0] = float("nan")
    assert math.isnan(compare.relative_error(y, x))
    assert math.isnan(compare.relative_error(x[:1], x))


def test_flops_of_a_linear_layer_counted_once_per_shape():
    layer = torch.nn.Linear(64, 32)
    calls = []

    def run():
        calls.append(1)
        return layer(torch.randn(8, 64))

    cache = flops.FlopCache()
    assert cache.get_or_count(layer, (8, 64), run) == 2 * 8 * 64 * 32
    assert cache.get_or_count(layer, (8, 64), run) == 2 * 8 * 64 * 32
    assert len(calls) == 1
    assert cache.get(layer, (16, 64)) is None


def test_peak_table_and_memory_on_cpu():
    peak, source = flops.gpu_peak_tflops("cpu")
    assert peak is None and "cpu" in source
    assert memory.PeakMemory("cpu").peak_bytes() is None
    assert memory.process_peak_rss_bytes() > 0


class _Recorder(Reporter):
    def __init__(self):
        self.events = []

    def run_started(self, run, kind, total_runs):
        self.events.append(("start", run, kind))

    def step_done(self, run, step, steps):
        self.events.append(("step", run, step))

    def first_call_tick(self, elapsed_s):
        self.events.append(("tick", elapsed_s))

    def run_finished(self, stats):
        self.events.append(("done", len(stats.runs), stats.status))


def _fake_sampler(step_s: float, steps: int, first_extra_s: float = 0.0):
    runs = []

    def sample_once(timer, step_done):
        if not runs:
            time.sleep(first_extra_s)  # "compiling"
        runs.append(1)
        timer.start()
        for _ in range(steps):
            time.sleep(step_s)
            step_done()
        return len(runs)

    return sample_once


def test_run_benchmark_runs_first_call_warmups_and_timed_runs():
    rep = _Recorder()
    st = BenchmarkStats(steps=3, warmup_runs=2, timed_runs=2, device="cpu")
    flop_calls = []
    last = run_benchmark(_fake_sampler(0.01, 3, first_extra_s=0.25), steps=3, warmup=2, runs=2, stats=st,
                         device="cpu", reporter=rep, count_run_flops=lambda: flop_calls.append(1) or 1000,
                         tick_seconds=0.05)
    assert last == 4
    assert [r.kind for r in st.runs] == [FIRST_CALL, WARM_UP, TIMED, TIMED]
    assert st.status == "done" and flop_calls == [1]
    assert all(r.flops == 1000 and r.steps == 3 for r in st.runs)
    assert st.runs[0].seconds > st.runs[2].seconds + 0.2  # the first call's extra time is its own
    assert len([e for e in rep.events if e[0] == "tick"]) >= 2  # ticks while the first call runs
    assert len([e for e in rep.events if e[0] == "step"]) == 12
    assert rep.events[-1] == ("done", 4, "done")


def test_run_benchmark_keeps_timings_when_flop_counting_fails():
    st = BenchmarkStats(steps=2, warmup_runs=0, timed_runs=1, device="cpu")

    def broken():
        raise RuntimeError("no flops here")

    run_benchmark(_fake_sampler(0.001, 2), steps=2, warmup=0, runs=1, stats=st, device="cpu", count_run_flops=broken)
    assert st.runs[0].flops is None and "no flops here" in st.setup["flops_error"]
    assert st.as_dict()["it_per_s"] > 0


@pytest.mark.parametrize("warmup, runs", [(1, 0), (-1, 1)])
def test_run_benchmark_rejects_bad_counts(warmup, runs):
    st = BenchmarkStats(steps=2, warmup_runs=warmup, timed_runs=runs, device="cpu")
    with pytest.raises(ValueError, match="runs"):
        run_benchmark(_fake_sampler(0.001, 2), steps=2, warmup=warmup, runs=runs, stats=st, device="cpu")


def test_first_call_says_where_its_compile_time_went():
    """torch's own compile timers, read around the first call of a real torch.compile: the tracing and
    backend parts add up to the frame's compile, the code cache was consulted, later runs compile nothing."""
    from diffboost.measure.compile_phases import describe

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))
    compiled = torch.compile(model)
    x = torch.randn(4, 16)

    def sample_once(timer, step_done):
        timer.start()
        with torch.no_grad():
            out = compiled(x)
        step_done()
        return out

    st = BenchmarkStats(steps=1, warmup_runs=1, timed_runs=2, device="cpu")
    run_benchmark(sample_once, steps=1, warmup=1, runs=2, stats=st, device="cpu")
    phases = st.runs[0].compile_phases
    assert phases["compile_s"] > 0 and phases["backend_s"] > 0 and phases["tracing_s"] > 0
    assert phases["tracing_s"] + phases["backend_s"] == pytest.approx(phases["compile_s"], abs=2e-3)
    assert phases["compile_s"] <= st.runs[0].seconds
    counts = phases["cache_counts"]
    assert counts.get("inductor.fxgraph_cache_hit", 0) + counts.get("inductor.fxgraph_cache_miss", 0) == 1
    assert all(r.compile_phases is None for r in st.runs[1:])
    d = st.as_dict()
    assert d["first_call_compile"] == phases
    assert "s compiling:" in describe(phases) and describe(None) == "nothing compiled"
    assert "s compiling:" in format_stats(d)
