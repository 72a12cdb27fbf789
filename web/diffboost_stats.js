// Draws the Benchmark Sampler's figures as a table on the node: live from the "diffboost.stats"
// websocket events while it runs, and from the node's executed output (also kept in /history).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "DiffBoostBenchmarkSampler";
const EVENT = "diffboost.stats";

function fmt(value, digits = 3, unit = "") {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return `${Number(value).toFixed(digits)}${unit}`;
}

function bytes(n) {
  if (n === null || n === undefined) return "- (no device counter)";
  return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`;
}

function ranged(stats, metric, digits) {
  const s = stats.spread?.[metric];
  if (!s) return "-";
  return `${fmt(s.median, digits)}  (${fmt(s.min, digits)} – ${fmt(s.max, digits)})`;
}

// Where the first call's compile time went (torch's timers), or "-" when nothing was compiled.
function compileBreakdown(c) {
  if (!c) return "-";
  let text = `${fmt(c.compile_s, 1, " s")}: tracing ${fmt(c.tracing_s, 1, " s")}, backend ${fmt(c.backend_s, 1, " s")}`;
  if (c.saved_graph_loading_s) text += `, loading a saved graph ${fmt(c.saved_graph_loading_s, 1, " s")}`;
  if (c.cuda_graph_recording_s) text += `, CUDA graphs ${fmt(c.cuda_graph_recording_s, 1, " s")}`;
  const counts = Object.entries(c.cache_counts || {}).map(([k, n]) => `${k.split(".").pop()} ${n}`);
  return counts.length ? `${text}  (${counts.join(", ")})` : text;
}

// Rows of [label, value]; every value is text, written with textContent (no HTML injection).
function rows(stats) {
  const tflops = stats.tflops === null ? "-" :
    fmt(stats.tflops, 2) + (stats.fraction_of_peak === null ? "" : `  (${fmt(stats.fraction_of_peak * 100, 1)}% of peak)`);
  const diffboost = stats.recompiles_diffboost === null ? "" : `, diffboost ${stats.recompiles_diffboost}`;
  return [
    ["status", `${stats.status}: ${stats.timed_runs_done}/${stats.timed_runs} timed runs, ${stats.steps} steps`],
    ["model", stats.model_state],
    ["it/s", ranged(stats, "it_per_s", 3)],
    ["run time s", ranged(stats, "run_s", 3)],
    ["first call", `${fmt(stats.first_call_s, 2, " s")}  (${stats.first_call_graphs ?? 0} graphs compiled)`],
    ["compiling", compileBreakdown(stats.first_call_compile)],
    ["peak memory", bytes(stats.peak_mem_bytes)],
    ["recompiles", `${stats.recompiles}  (dynamo ${stats.recompiles_dynamo}${diffboost})`],
    ["TFLOP/s", tflops],
    ["device", stats.device_name || stats.device],
  ];
}

function render(node, stats, note) {
  const el = node.diffboostStatsElement;
  if (!el) return;
  el.replaceChildren();
  if (note) {
    const p = document.createElement("div");
    p.textContent = note;
    p.style.opacity = "0.8";
    el.appendChild(p);
  }
  if (!stats) return;
  const table = document.createElement("table");
  table.style.cssText = "border-collapse:collapse;font:11px monospace;width:100%";
  for (const [label, value] of rows(stats)) {
    const tr = table.insertRow();
    const th = tr.insertCell();
    th.textContent = label;
    th.style.cssText = "padding:1px 6px 1px 0;opacity:0.7;white-space:nowrap;vertical-align:top";
    const td = tr.insertCell();
    td.textContent = value ?? "-";
    td.style.cssText = "padding:1px 0;word-break:break-word";
  }
  el.appendChild(table);
  node.setDirtyCanvas?.(true, true);
}

function findNode(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
}

app.registerExtension({
  name: "diffboost.stats",

  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    const el = document.createElement("div");
    el.style.cssText = "padding:4px;color:var(--fg-color, #ddd);overflow:auto";
    node.diffboostStatsElement = el;
    node.addDOMWidget?.("diffboost_stats", "diffboost_stats", el, { serialize: false });
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      render(this, output?.diffboost_stats?.[0]);
    };
  },

  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = findNode(detail?.node);
      if (!node || node.comfyClass !== NODE_CLASS) return;
      if (detail.phase === "first_call") {
        render(node, null, `first call running for ${fmt(detail.elapsed_s, 0, " s")} (compiling, if compiled)`);
      } else if (detail.phase === "run_started") {
        render(node, node.diffboostLastStats, `${detail.kind} (run ${detail.run + 1}/${detail.total_runs})…`);
      } else if (detail.stats) {
        node.diffboostLastStats = detail.stats;
        render(node, detail.stats);
      }
    });
  },
});
