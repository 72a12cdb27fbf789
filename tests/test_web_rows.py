"""The Benchmark Sampler's table rows (web/diffboost_stats.js), computed by node from a stats dict of
the real shape. Drawing them on the node inside ComfyUI's frontend is tests/test_browser.py's job;
here only the text of each row, so that a wrong field name shows up also where no browser runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from diffboost.measure.runner import run_benchmark
from diffboost.measure.stats import BenchmarkStats

SCRIPT = Path(__file__).resolve().parents[1] / "web" / "diffboost_stats.js"


def rows_from_js(stats: dict, tmp_path: Path) -> dict:
    if shutil.which("node") is None:
        pytest.skip("WEB ROW TESTS SKIPPED: node is not installed (scripts/setup.sh installs it)")
    # The module's own code, without ComfyUI's frontend imports (only its registration uses them).
    body = "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.startswith("import "))
    module = tmp_path / "rows.mjs"
    module.write_text("const app = {registerExtension() {}}; const api = {addEventListener() {}};\n" + body +
                      f"\nconsole.log(JSON.stringify(Object.fromEntries(rows({json.dumps(stats)}))));\n")
    done = subprocess.run(["node", str(module)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_first_call_and_its_compile_breakdown_are_shown(tmp_path):
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(8, 8))

    def sample_once(timer, step_done):
        timer.start()
        with torch.no_grad():
            compiled(torch.randn(2, 8))
        step_done()

    st = BenchmarkStats(steps=1, warmup_runs=1, timed_runs=1, device="cpu")
    run_benchmark(sample_once, steps=1, warmup=1, runs=1, stats=st, device="cpu")
    stats = st.as_dict()
    shown = rows_from_js(stats, tmp_path)
    phases = stats["first_call_compile"]
    assert shown["compiling"].startswith(f"{phases['compile_s']:.1f} s: tracing {phases['tracing_s']:.1f} s")
    assert "fxgraph_cache_" in shown["compiling"]  # the code cache was consulted: hit or miss, it says which
    assert shown["first call"].startswith(f"{stats['first_call_s']:.2f} s")
    stats["first_call_compile"] = None  # an eager model compiles nothing
    assert rows_from_js(stats, tmp_path)["compiling"] == "-"
