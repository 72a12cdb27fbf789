"""The benchmark loop, shared by the Benchmark Sampler node and the bench CLI: a first call
(where compilation happens), warm-ups, then timed runs, each measured the same way."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from . import compile_phases
from .memory import PeakMemory, process_peak_rss_bytes
from .stats import FIRST_CALL, TIMED, WARM_UP, BenchmarkStats, RunStats
from .timer import StepTimer, synchronize


class Reporter:
    """Told how a benchmark progresses. Every method may be called from the sampling thread;
    `first_call_tick` is called from a timer thread. The default does nothing."""

    def run_started(self, run: int, kind: str, total_runs: int) -> None: ...

    def step_done(self, run: int, step: int, steps: int) -> None: ...

    def first_call_tick(self, elapsed_s: float) -> None: ...

    def run_finished(self, stats: BenchmarkStats) -> None: ...


def dynamo_graph_count() -> int:
    """Graphs torch.dynamo has captured in this process so far (any torch.compile user)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # torch built without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def run_benchmark(sample_once: Callable[[StepTimer, Callable[[], None]], object], *, steps: int, warmup: int,
                  runs: int, stats: BenchmarkStats, device: torch.device | str,
                  reporter: Reporter | None = None,
                  diffboost_graph_count: Callable[[], int | None] = lambda: None,
                  count_run_flops: Callable[[], int | None] | None = None,
                  tick_seconds: float = 1.0) -> object:
    """Run `sample_once(timer, step_done)` warmup + runs times (at least once) and fill `stats`.

    `sample_once` must call `timer.start()` when stepping begins (before the first denoiser call) and `step_done()`
    after each sampling step, and return the run's result; the last result is returned.
    `count_run_flops()` is called once, after the first run, outside any timing.
    Raises ValueError when runs < 1 or warmup < 0.
    """
    if runs < 1:
        raise ValueError(f"timed runs is {runs}: at least 1 timed run is needed to measure anything")
    if warmup < 0:
        raise ValueError(f"warm-up runs is {warmup}: use 0 or more")
    reporter = reporter or Reporter()
    memory = PeakMemory(device)
    stats.peak_mem_source = memory.source
    timer = StepTimer(device)
    total = warmup + runs
    flops = None
    result = None
    for index in range(total):
        kind = FIRST_CALL if index == 0 else (WARM_UP if index < warmup else TIMED)
        reporter.run_started(index, kind, total)
        step_done = _StepCounter(index, steps, timer, reporter)

        timer.reset()
        synchronize(device)
        memory.reset()
        dynamo_before, diffboost_before = dynamo_graph_count(), diffboost_graph_count()
        ticker = _Ticker(reporter.first_call_tick, tick_seconds) if index == 0 else None
        compiled_before = compile_phases.snapshot() if index == 0 else None
        start = time.perf_counter()
        try:
            result = sample_once(timer, step_done)
            synchronize(device)
        finally:
            if ticker:
                ticker.stop()
        seconds = time.perf_counter() - start
        diffboost_after = diffboost_graph_count()
        run = RunStats(index=index, kind=kind, seconds=seconds, step_seconds=timer.step_seconds(),
                       peak_mem_bytes=memory.peak_bytes(), dynamo_graphs=dynamo_graph_count() - dynamo_before,
                       diffboost_graphs=(None if diffboost_after is None
                                         else diffboost_after - (diffboost_before or 0)))
        if compiled_before is not None:
            run.compile_phases = compile_phases.between(compiled_before, compile_phases.snapshot())
        if index == 0 and count_run_flops is not None:
            flops = _count_safely(count_run_flops, stats)
        run.flops = flops
        if index == 0:
            for earlier in stats.runs:
                earlier.flops = flops
        stats.runs.append(run)
        stats.process_peak_rss_bytes = process_peak_rss_bytes()
        if index == total - 1:
            stats.status = "done"
        reporter.run_finished(stats)
    return result


def _count_safely(count: Callable[[], int | None], stats: BenchmarkStats) -> int | None:
    try:
        return count()
    except Exception as e:  # FLOPs are a nice-to-have: never lose the timings over them
        stats.setup["flops_error"] = f"{type(e).__name__}: {e}"[:300]
        return None


class _StepCounter:
    """The per-step callback of one run: marks the timer and tells the reporter."""

    def __init__(self, run: int, steps: int, timer: StepTimer, reporter: Reporter):
        self.run, self.steps, self.timer, self.reporter = run, steps, timer, reporter
        self.done = 0

    def __call__(self) -> None:
        self.timer.step()
        self.done += 1
        self.reporter.step_done(self.run, self.done, self.steps)


class _Ticker:
    """Calls `tick(elapsed_seconds)` every `every` seconds on a daemon thread until stopped."""

    def __init__(self, tick: Callable[[float], None], every: float):
        self._tick = tick
        self._every = every
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="diffboost-first-call-ticker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._tick(time.perf_counter() - self._start)
            except Exception:  # a broken reporter must not break sampling
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
