"""How the Benchmark Sampler's figures reach the user while it runs: a `diffboost.stats` websocket
event after every run (and every second of the first call), the node's progress text, and
ComfyUI's progress bar over all the steps of all runs."""

from __future__ import annotations

import comfy.utils

from ..measure.runner import Reporter
from ..measure.stats import FIRST_CALL, BenchmarkStats, format_stats

EVENT = "diffboost.stats"


def send_event(server, node_id: str, phase: str, stats: dict | None = None, **extra) -> None:
    """Send one `diffboost.stats` event: {"node", "prompt_id", "phase", "stats", ...extra}."""
    if server is None:
        return
    payload = {"node": node_id, "prompt_id": getattr(server, "last_prompt_id", None), "phase": phase,
               "stats": stats, **extra}
    server.send_sync(EVENT, payload, getattr(server, "client_id", None))


class NodeReporter(Reporter):
    """Reports a benchmark on the node `node_id` through the PromptServer `server` (None: silent)."""

    def __init__(self, server, node_id: str, total_steps: int, model_state: str):
        self.server = server
        self.node_id = node_id
        self.model_state = model_state
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self._run_label = ""

    def _text(self, text: str) -> None:
        if self.server is not None and hasattr(self.server, "send_progress_text"):
            self.server.send_progress_text(text, self.node_id)

    def run_started(self, run: int, kind: str, total_runs: int) -> None:
        self._run_label = f"{kind} (run {run + 1}/{total_runs})"
        if kind == FIRST_CALL:
            self._text(f"{self._run_label}: compiles now if the model is compiled [{self.model_state}]")
        else:
            self._text(f"{self._run_label}...")
        send_event(self.server, self.node_id, "run_started", None, run=run, kind=kind, total_runs=total_runs)

    def step_done(self, run: int, step: int, steps: int) -> None:
        self.bar.update(1)

    def first_call_tick(self, elapsed_s: float) -> None:
        self._text(f"{self._run_label}: running for {elapsed_s:.0f} s (compiling, if the model is compiled)")
        send_event(self.server, self.node_id, "first_call", None, elapsed_s=round(elapsed_s, 1))

    def run_finished(self, stats: BenchmarkStats) -> None:
        d = stats.as_dict()
        d["node"] = self.node_id
        self._text(format_stats(d))
        send_event(self.server, self.node_id, "run_finished", d)
