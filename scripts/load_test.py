#!/usr/bin/env python
"""Load test: a real headless ComfyUI server (CPU, 127.0.0.1 only) with this pack, fed N queued
prompts at once: eager, compiled (two modes, two resolutions, two architectures), FP8 on the
reference path, a compile that falls back to eager, and an injected failure every tenth prompt.

Waits for all of them (at most --timeout seconds), then checks that every good prompt has its
output in /history, that every bad one carries its error naming the node, and that the server's
memory stayed bounded once each kind of prompt had run once. Prints a table, exits 1 on any
violation, and stops the server in every case.

    .venv/bin/python scripts/load_test.py                  # the full run: 100 prompts
    .venv/bin/python scripts/load_test.py --prompts 10     # the quick run the test suite makes

Needs ComfyUI (COMFYUI_PATH or ~/ComfyUI) and the test extra; the tiny models are written on first
use (or taken from --models-dir).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test harness: server, tiny models, test nodes

from helpers import host as harness  # noqa: E402
from helpers import tiny_models as T  # noqa: E402
from helpers.server import ComfyServer, PromptRejected  # noqa: E402
from helpers.test_nodes.failing_backends import FAILURE_TEXT  # noqa: E402

INSERTED = str(T.FIRST_INSERTED_ID)
SAMPLER, CAPTURE = T.NODE_IDS["sampler"], T.NODE_IDS["capture"]
REGISTER_BACKENDS = {"1": {"class_type": "DiffBoostTest_RegisterBackends", "inputs": {}}}
FP8 = {"min_features": 16, "min_weights_millions": 0.0, "allow_reference_path": True}


@dataclass(frozen=True)
class Variant:
    name: str
    arch: str = "sd15"
    size: int = 64
    compile: dict | None = None  # Compile Model inputs, or None
    quantize: bool = False  # Quantize FP8 on the reference path
    fails_at: str | None = None  # the node its execution error must name; "validation" if POST rejects it
    says: tuple[str, ...] = ()  # what that error message must contain


COMPILE_NODE = f"Compile Model (diffboost), node {INSERTED}"
# Prompt i runs VARIANTS[i % 10]; neighbours share a Compile node so that ComfyUI reuses it across a
# resolution change, as it does for a user who changes the image size.
VARIANTS = [
    Variant("eager sd15 64"),
    Variant("inductor O2 sd15 64", compile={"mode": "O2"}),
    Variant("inductor O2 sd15 96", size=96, compile={"mode": "O2"}),
    Variant("fp8 reference sd15 64", quantize=True),
    Variant("falls back to eager sd15 64", compile={"backend": "diffboost-test-crash",
                                                    "on_failure": "fall back to eager"}),
    Variant("eager sd3 64", arch="sd3"),
    Variant("inductor default sd3 64", arch="sd3", compile={"mode": "default"}),
    Variant("eager sd15 96", size=96),
    Variant("fp8 reference sd15 96", size=96, quantize=True),
    None,  # the injected failure: FAILURES, in turn
]
FAILURES = [
    Variant("failure: compile crashes at the first step", compile={"backend": "diffboost-test-crash"},
            fails_at=SAMPLER, says=(f"(from {COMPILE_NODE})", FAILURE_TEXT, "on_failure")),
    Variant("failure: backend raises when compiling", compile={"backend": "diffboost-test-broken"},
            fails_at=INSERTED, says=(COMPILE_NODE, FAILURE_TEXT, "on_failure")),
    Variant("failure: contradictory mode (rejected)", compile={"mode": "jit:max-autotune"},
            fails_at="validation", says=("contradicts itself",)),
]


def variant_of(i: int) -> Variant:
    v = VARIANTS[i % len(VARIANTS)]
    return v if v is not None else FAILURES[(i // len(VARIANTS)) % len(FAILURES)]


@dataclass
class Queued:
    index: int
    variant: Variant
    prompt_id: str | None = None
    rejection: dict | None = None  # POST /prompt's error body
    history: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- prompts

class PromptBuilder:
    """API prompts for the variants, widget defaults taken from the server's /object_info."""

    def __init__(self, server: ComfyServer, models: T.TinyModels):
        self.models = models
        self.specs = {c: server.object_info(c)[c]["input"] for c in ("DiffBoostCompileModel", "DiffBoostQuantizeFP8")}

    def node(self, class_type: str, link, **inputs) -> dict:
        return harness.node_with_defaults(self.specs[class_type], class_type, model=link, **inputs)

    def build(self, i: int, v: Variant) -> dict:
        inserts = []
        if v.compile is not None:
            inputs = {"backend": "inductor", "on_failure": "fail", "compile_cache": "off", **v.compile}
            inserts.append(lambda link: self.node("DiffBoostCompileModel", link, **inputs))
        if v.quantize:
            inserts.append(lambda link: self.node("DiffBoostQuantizeFP8", link, **FP8))
        return T.graph(v.arch, self.models, insert=inserts, seed=i, width=v.size, height=v.size, decode=False,
                       key=f"load-{i}")


# ---------------------------------------------------------------------------------------------- memory

class RssSampler(threading.Thread):
    """Samples the server's RSS every `period` seconds, with how many prompts had finished by then."""

    def __init__(self, server: ComfyServer, finished: list[int], period: float = 0.5):
        super().__init__(daemon=True)
        self.server, self.finished, self.period = server, finished, period
        self.samples: list[tuple[int, float]] = []  # (prompts finished, RSS in MB)
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            try:
                self.samples.append((self.finished[0], self.server.rss_bytes() / 2**20))
            except Exception:  # the process is gone: the checks report it
                return
            self.stop_event.wait(self.period)

    def stop(self):
        self.stop_event.set()
        self.join(5)


def memory_violations(samples, warm_after: int, max_growth_mb: float, max_rss_mb: float) -> tuple[list, dict]:
    """Violations and figures: RSS may grow by at most max_growth_mb past its level when `warm_after`
    prompts had finished (every kind of prompt has run once by then), and never pass max_rss_mb."""
    figures = {"start_mb": samples[0][1] if samples else None, "peak_mb": max((s[1] for s in samples), default=None),
               "end_mb": samples[-1][1] if samples else None, "warm_mb": None, "growth_mb": None}
    problems = []
    if figures["peak_mb"] is not None and figures["peak_mb"] > max_rss_mb:
        problems.append(f"server RSS reached {figures['peak_mb']:.0f} MB, over the {max_rss_mb:.0f} MB limit")
    warm = [mb for done, mb in samples if done >= warm_after]
    if len(warm) > 1:
        figures["warm_mb"] = warm[0]
        figures["growth_mb"] = max(warm) - warm[0]
        if figures["growth_mb"] > max_growth_mb:
            problems.append(f"server RSS grew by {figures['growth_mb']:.0f} MB after every kind of prompt had run "
                            f"once (limit {max_growth_mb:.0f} MB)")
    return problems, figures


# ---------------------------------------------------------------------------------------------- run

def queue_all(server: ComfyServer, builder: PromptBuilder, count: int) -> list[Queued]:
    queued = []
    for i in range(count):
        q = Queued(i, variant_of(i))
        try:
            q.prompt_id = server.post_prompt(builder.build(i, q.variant))
        except PromptRejected as e:
            q.rejection = e.body if isinstance(e.body, dict) else {"error": e.body}
        queued.append(q)
    return queued


def wait_for_all(server: ComfyServer, queued: list[Queued], finished: list[int], timeout: float) -> None:
    """Poll /history until every posted prompt has its entry (it is written when the prompt ends)."""
    deadline = time.monotonic() + timeout
    pending = {q.prompt_id: q for q in queued if q.prompt_id is not None}
    while True:
        history = server.get_json("/history")
        for prompt_id in [p for p in pending if p in history]:
            pending.pop(prompt_id).history = history[prompt_id]
        finished[0] = len(queued) - len(pending)
        if not pending or time.monotonic() > deadline or server.proc.poll() is not None:
            return
        time.sleep(0.5)


def check(q: Queued) -> list[str]:
    """What is wrong with one prompt's outcome (nothing: an empty list)."""
    v = q.variant
    if v.fails_at == "validation":
        errors = (q.rejection or {}).get("node_errors", {})
        text = str(q.rejection)
        if list(errors) != [INSERTED] or not all(s in text for s in v.says):
            return [f"not rejected naming node {INSERTED} with {v.says}: {text[:300]}"]
        return []
    if q.rejection is not None:
        return [f"rejected: {str(q.rejection)[:300]}"]
    if not q.history:
        return ["no /history entry (not finished in time)"]
    status = q.history.get("status", {})
    errors = [d for event, d in status.get("messages", []) if event == "execution_error"]
    if v.fails_at is not None:
        if status.get("status_str") != "error" or len(errors) != 1:
            return [f"should have failed at node {v.fails_at}: status {status.get('status_str')}"]
        e = errors[0]
        missing = [s for s in v.says if s not in e.get("exception_message", "")]
        if e.get("node_id") != v.fails_at or missing:
            return [f"error names node {e.get('node_id')} (expected {v.fails_at}), message lacks {missing}: "
                    f"{e.get('exception_message', '')[:300]}"]
        return []
    if status.get("status_str") != "success":
        return [f"failed: {[e.get('exception_message', '')[:300] for e in errors]}"]
    cached = {n for event, d in status.get("messages", []) if event == "execution_cached" for n in d["nodes"]}
    return check_outputs(q.history.get("outputs", {}), v, cached)


def check_outputs(outputs: dict, v: Variant, cached: set[str]) -> list[str]:
    capture = (outputs.get(CAPTURE, {}).get("diffboost_test_capture") or [None])[0]
    side = v.size // 8
    expected_shape = [1, T.LATENT_CHANNELS[v.arch], side, side]
    if capture is None:
        return ["no latent in /history"]
    problems = []
    if capture["shape"] != expected_shape or not capture["finite"]:
        problems.append(f"latent {capture['shape']} finite={capture['finite']}, expected {expected_shape}")
    if v.compile is not None and INSERTED not in cached:  # a cached node's text is not in this prompt's history
        text = (outputs.get(INSERTED, {}).get("text") or [""])[0]
        if not text.startswith(f"compiled: {v.compile.get('backend', 'inductor')} "):
            problems.append(f"Compile Model says {text!r}")
    return problems


def run_seconds(history: dict) -> float | None:
    """Execution wall time from the history's start and end timestamps (milliseconds)."""
    stamps = {event: d.get("timestamp") for event, d in history.get("status", {}).get("messages", [])}
    end = stamps.get("execution_success") or stamps.get("execution_error")
    start = stamps.get("execution_start")
    return (end - start) / 1000 if start and end else None


# ---------------------------------------------------------------------------------------------- report

def summary_table(queued: list[Queued], problems: dict[int, list[str]]) -> str:
    rows = {}
    for q in queued:
        r = rows.setdefault(q.variant.name, {"n": 0, "ok": 0, "failed as expected": 0, "violations": 0,
                                             "seconds": []})
        r["n"] += 1
        if problems.get(q.index):
            r["violations"] += 1
        elif q.variant.fails_at is not None:
            r["failed as expected"] += 1
        else:
            r["ok"] += 1
        s = run_seconds(q.history)
        if s is not None:
            r["seconds"].append(s)
    width = max(len(name) for name in rows)
    lines = [f"{'variant':{width}s} {'prompts':>7s} {'ok':>4s} {'failed as expected':>18s} {'violations':>10s} "
             f"{'median s':>8s} {'max s':>7s}"]
    for name, r in rows.items():
        med = f"{statistics.median(r['seconds']):8.2f}" if r["seconds"] else f"{'-':>8s}"
        top = f"{max(r['seconds']):7.2f}" if r["seconds"] else f"{'-':>7s}"
        lines.append(f"{name:{width}s} {r['n']:7d} {r['ok']:4d} {r['failed as expected']:18d} "
                     f"{r['violations']:10d} {med} {top}")
    return "\n".join(lines)


def memory_lines(figures: dict, samples: list) -> str:
    def mb(x):
        return "-" if x is None else f"{x:.0f} MB"

    return (f"server RSS: start {mb(figures['start_mb'])}, after every kind ran once {mb(figures['warm_mb'])}, "
            f"peak {mb(figures['peak_mb'])}, end {mb(figures['end_mb'])}, growth after warm-up "
            f"{mb(figures['growth_mb'])} ({len(samples)} samples)")


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=100, help="how many prompts to queue (default 100)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for all of them (default 1800)")
    p.add_argument("--max-growth-mb", type=float, default=400,
                   help="how much the server's RSS may grow after every kind of prompt ran once (default 400)")
    p.add_argument("--max-rss-mb", type=float, default=8000, help="the server's RSS limit (default 8000)")
    p.add_argument("--work-dir", type=Path, help="server folders and log (default: a temporary folder, removed)")
    p.add_argument("--models-dir", type=Path, help="an existing tiny-models folder to reuse")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comfy_path = harness.import_comfy()  # writing the tiny models builds ComfyUI modules on the meta device
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="diffboost-load-"))
    work.mkdir(parents=True, exist_ok=True)
    models = T.TinyModels(args.models_dir or work / "models").ensure(["sd15", "sd3"])
    server = ComfyServer(comfy_path, work, models)
    started = time.monotonic()
    server.start()
    finished = [0]
    sampler = RssSampler(server, finished)
    try:
        server.run(REGISTER_BACKENDS)
        sampler.start()
        queued = queue_all(server, PromptBuilder(server, models), args.prompts)
        wait_for_all(server, queued, finished, args.timeout)
        healthy = server.proc.poll() is None and server.queue_size() == 0
    finally:
        sampler.stop()
        server.stop()
    problems = {q.index: check(q) for q in queued}
    mem_problems, figures = memory_violations(sampler.samples, len(VARIANTS), args.max_growth_mb, args.max_rss_mb)
    violations = [f"prompt {i} ({queued[i].variant.name}): {p}" for i, ps in problems.items() for p in ps]
    violations += mem_problems
    if not healthy:
        violations.append("the server died or still had prompts queued at the end:\n" + server.log_tail(3000))
    print(summary_table(queued, problems))
    print(memory_lines(figures, sampler.samples))
    print(f"{len(queued)} prompts in {time.monotonic() - started:.0f} s, {len(violations)} violations")
    for v in violations:
        print("VIOLATION:", v)
    if args.work_dir is None and not violations:
        shutil.rmtree(work, ignore_errors=True)
    elif violations:
        print(f"server log: {server.log_path}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
