"""The web extension (web/diffboost_stats.js) in headless Chromium against a real headless ComfyUI:
the bundled SD1.5 workflow is opened from the pack's template route, queued from the frontend with
the real inductor compile, and the Benchmark Sampler node must show the compile progress and then
the stats table with the figures /history keeps. The frontend's own UI -> API conversion of every
bundled workflow must also give its API twin.

Needs Chromium (/usr/bin/chromium, or DIFFBOOST_CHROMIUM) and the npm package playwright-core
(DIFFBOOST_PLAYWRIGHT_DIR, default ~/.cache/diffboost/browser-tools); scripts/setup.sh installs both.
A screenshot lands in test-artifacts/browser/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import workflows as wf

WORKFLOW = "sd15_t2i_512"
ARTIFACTS = wf.REPO / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("DIFFBOOST_CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT_DIR = Path(os.environ.get("DIFFBOOST_PLAYWRIGHT_DIR", Path.home() / ".cache/diffboost/browser-tools"))
SETUP_HINT = ("run scripts/setup.sh, or: apt-get install -y chromium nodejs npm && "
              f"npm install --prefix {PLAYWRIGHT_DIR} playwright-core")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = 240  # a real inductor compile of the tiny SD1.5 takes 30-100 s on 2 cores

# The browser side, run by node: opens ComfyUI, checks the frontend's conversion of each workflow,
# queues one and watches the Benchmark Sampler's stats element. Reads its settings from argv[2].
DRIVER = r"""
const { chromium } = require(process.argv[3]);
const cfg = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
async function closeDialogs(page) {
  for (let i = 0; i < 3; i++) {
    const closed = await page.evaluate(() => {
      const buttons = [...document.querySelectorAll('[role=dialog] button')]
        .filter(b => /close/i.test(b.getAttribute('aria-label') || '')
                     || b.classList.contains('p-dialog-close-button'));
      buttons.forEach(b => b.click());
      return buttons.length;
    });
    if (!closed) break;
    await page.waitForTimeout(300);
  }
}
(async () => {
  const browser = await chromium.launchPersistentContext(cfg.profile, {
    executablePath: cfg.chromium, args: cfg.flags, viewport: { width: 1500, height: 950 } });
  const page = browser.pages()[0] || await browser.newPage();
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  await page.goto(cfg.url);
  await page.waitForFunction(() => window.app && window.app.graph && window.comfyAPI?.api?.api,
                             null, { timeout: 90000 });
  const result = { errors };
  // The frontend's own UI -> API conversion of every bundled workflow the server has nodes for.
  result.converted = await page.evaluate(async (names) => {
    const out = {};
    for (const name of names) {
      const ui = await (await fetch(`/api/workflow_templates/diffboost/${name}.json`)).json();
      if (ui.nodes.some(n => n.type !== 'Note' && !LiteGraph.registered_node_types[n.type])) continue;
      await window.app.loadGraphData(ui, true, true, name);
      out[name] = (await window.app.graphToPrompt()).output;
    }
    return out;
  }, cfg.names);
  // Open the workflow as a user would (template route), shrink it for the CPU, queue it.
  await page.evaluate(async ({ name, overrides }) => {
    const ui = await (await fetch(`/api/workflow_templates/diffboost/${name}.json`)).json();
    await window.app.loadGraphData(ui, true, true, name);
    for (const [type, values] of Object.entries(overrides)) {
      for (const node of window.app.graph.nodes.filter(n => n.type === type)) {
        for (const [w, v] of Object.entries(values)) node.widgets.find(x => x.name === w).value = v;
      }
    }
    window.__diffboost = { notes: [], promptId: null, done: false, failed: null };
    const api = window.comfyAPI.api.api;
    api.addEventListener('execution_start', e => { window.__diffboost.promptId = e.detail.prompt_id; });
    api.addEventListener('execution_success', () => { window.__diffboost.done = true; });
    api.addEventListener('execution_error', e => { window.__diffboost.failed = e.detail; });
    const bench = window.app.graph.nodes.find(n => n.type === 'DiffBoostBenchmarkSampler');
    // Every distinct text the stats element shows while the prompt runs (compile progress included).
    const seen = new Set();
    const el = bench.diffboostStatsElement;
    setInterval(() => {
      const t = el.textContent;
      if (t && !seen.has(t)) { seen.add(t); window.__diffboost.notes.push(t); }
    }, 100);
    await window.app.queuePrompt(0, 1);
  }, { name: cfg.workflow, overrides: cfg.overrides });
  await page.waitForFunction(() => window.__diffboost.done || window.__diffboost.failed,
                             null, { timeout: cfg.timeout_ms, polling: 250 });
  // The table is drawn from the executed message, which comes just before execution_success.
  await page.waitForFunction(() => {
    const b = window.app.graph.nodes.find(n => n.type === 'DiffBoostBenchmarkSampler');
    return b.diffboostStatsElement.querySelector('table') || window.__diffboost.failed;
  }, null, { timeout: 10000 });
  Object.assign(result, await page.evaluate(() => {
    const bench = window.app.graph.nodes.find(n => n.type === 'DiffBoostBenchmarkSampler');
    const rows = [...bench.diffboostStatsElement.querySelectorAll('tr')]
      .map(tr => [...tr.cells].map(c => c.textContent));
    // Put the Benchmark Sampler and the saved image in view for the screenshot.
    const canvas = window.app.canvas;
    canvas.ds.scale = 1.0;
    canvas.ds.offset = [-bench.pos[0] + 120, -bench.pos[1] + 110];
    canvas.setDirty(true, true);
    return { promptId: window.__diffboost.promptId, failed: window.__diffboost.failed,
             notes: window.__diffboost.notes, rows, benchId: String(bench.id) };
  }));
  await closeDialogs(page);  // any dialog the workflow load opened
  await page.waitForTimeout(800);
  await page.screenshot({ path: cfg.screenshot });
  require('fs').writeFileSync(cfg.result, JSON.stringify(result));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
"""


@pytest.fixture(scope="module")
def playwright_core() -> Path:
    module = PLAYWRIGHT_DIR / "node_modules" / "playwright-core"
    missing = [what for what, ok in (("Chromium at " + CHROMIUM, Path(CHROMIUM).is_file()),
                                     ("node", shutil.which("node") is not None),
                                     ("playwright-core at " + str(module), module.is_dir())) if not ok]
    if missing:
        pytest.skip(f"!!! BROWSER TEST SKIPPED: {', '.join(missing)} missing: {SETUP_HINT} !!!")
    return module


def _post(url: str, value) -> None:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(value).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()


def cpu_overrides() -> dict:
    """Widget values changed in the page before queueing: CPU size; the compile is left as it is."""
    return {"EmptyLatentImage": {"width": 64, "height": 64},
            "DiffBoostBenchmarkSampler": {"steps": 2, "warmup_runs": 1, "timed_runs": 2}}


def test_stats_table_shows_the_history_figures(comfy_server, tiny_models, playwright_core, tmp_path):
    standins = wf.StandIns(tiny_models.root, tiny_models)  # the server lists this models folder
    standins.ensure(wf.BY_NAME[WORKFLOW])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / f"{WORKFLOW}_stats.png"
    cfg = {"chromium": CHROMIUM, "flags": CHROMIUM_FLAGS, "profile": str(tmp_path / "profile"),  # a fresh profile
           "url": comfy_server.url, "names": [s.name for s in wf.SCENARIOS], "workflow": WORKFLOW,
           "overrides": cpu_overrides(), "timeout_ms": RUN_TIMEOUT_S * 1000, "screenshot": str(screenshot),
           "result": str(tmp_path / "result.json")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # A new user gets the template browser on the first visit; it would cover the canvas.
    _post(comfy_server.url + "/settings/Comfy.TutorialCompleted", True)
    (tmp_path / "driver.js").write_text(DRIVER)
    proc = subprocess.run(["node", str(tmp_path / "driver.js"), str(tmp_path / "config.json"), str(playwright_core)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 120)
    assert proc.returncode == 0, f"browser driver failed:\n{proc.stderr[-4000:]}\n{comfy_server.log_tail(3000)}"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["failed"] is None, f"the prompt failed: {result['failed']}"
    assert result["errors"] == [], f"page errors: {result['errors']}"

    for name, output in result["converted"].items():
        assert wf.same_graph(output, wf.api_workflow(name)) == [], f"frontend conversion of {name}"
    expected = {s.name for s in wf.SCENARIOS if not s.needs_pack}
    assert expected <= set(result["converted"])

    # Compile progress: the first call's ticks ("first call running for N s") while inductor compiles.
    assert any("first call running for" in note for note in result["notes"]), result["notes"]

    stats = comfy_server.history(result["promptId"])["outputs"][result["benchId"]]["diffboost_stats"][0]
    table = dict(result["rows"])
    assert table["status"] == f"done: {stats['timed_runs_done']}/{stats['timed_runs']} timed runs, 2 steps"
    it_s = stats["spread"]["it_per_s"]
    assert table["it/s"] == f"{it_s['median']:.3f}  ({it_s['min']:.3f} – {it_s['max']:.3f})"
    run_s = stats["spread"]["run_s"]
    assert table["run time s"].startswith(f"{run_s['median']:.3f}")
    assert table["first call"].startswith(f"{stats['first_call_s']:.2f} s")
    assert table["model"] == stats["model_state"] and "compiled: inductor (mode=O3)" in table["model"]
    assert screenshot.stat().st_size > 10_000
