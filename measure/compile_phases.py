"""Where a first call's compile time went, read from torch's own compile timers and cache counters.

torch times each compile stage it runs (`dynamo_timed`) and counts its cache hits; the difference
between two snapshots taken around a call says what that call spent on tracing, on the backend
(AOTAutograd and inductor: code generation, or loading it from a cache) and on recording CUDA graphs,
and which caches it hit. A warm start that is still slow shows here which part no cache removed.
"""

from __future__ import annotations

# torch's timer names: the whole frame's compile, and the backend's part of it.
FRAME = "_compile.compile_inner"
BACKEND = "OutputGraph.call_user_compiler"
CUDA_GRAPH_RECORD = "CUDAGraphNode.record"
# A saved graph's first call: torch's whole-graph ahead-of-time compile (tracing, then AOTAutograd and
# inductor), or diffboost loading the saved graph in a new process (timed under this name).
AHEAD_OF_TIME = "fullgraph_capture"
AHEAD_OF_TIME_BACKEND = "create_aot_dispatcher_function"
SAVED_GRAPH_LOAD = "diffboost.load_saved_graph"
SAVED_GRAPH_SAVE = "diffboost.save_saved_graph"  # after a cold compile: the graph written and loaded back
CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                  ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"))
TOP_TIMERS = 40  # enough to see each of inductor's phases in a cold compile


def snapshot() -> dict:
    """torch's cumulative compile timers (seconds per name) and cache counters, now."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except Exception:  # a torch without dynamo compiles nothing
        return {"times": {}, "counts": {}}
    return {"times": {name: sum(values) for name, values in compilation_time_metrics.items()},
            "counts": {f"{group}.{name}": int(counters[group][name]) for group, name in CACHE_COUNTERS}}


def between(before: dict, after: dict) -> dict | None:
    """What was compiled between two snapshots; None when nothing was."""
    spent = {name: t - before["times"].get(name, 0.0) for name, t in after["times"].items()}
    spent = {name: t for name, t in spent.items() if t > 0}
    counts = {name: n - before["counts"].get(name, 0) for name, n in after["counts"].items()}
    if not spent and not any(counts.values()):
        return None
    if FRAME in spent or AHEAD_OF_TIME not in spent:
        frame, backend = spent.get(FRAME, 0.0), spent.get(BACKEND, 0.0)
    else:
        frame, backend = spent[AHEAD_OF_TIME], spent.get(AHEAD_OF_TIME_BACKEND, 0.0)
    top = sorted(spent.items(), key=lambda item: -item[1])[:TOP_TIMERS]
    return {"compile_s": round(frame, 3),
            "tracing_s": round(max(frame - backend, 0.0), 3),  # dynamo's bytecode tracing and guards
            "backend_s": round(backend, 3),
            "cuda_graph_recording_s": round(spent.get(CUDA_GRAPH_RECORD, 0.0), 3),
            "saved_graph_loading_s": round(spent.get(SAVED_GRAPH_LOAD, 0.0), 3),
            "saved_graph_saving_s": round(spent.get(SAVED_GRAPH_SAVE, 0.0), 3),
            "cache_counts": {name: n for name, n in counts.items() if n},
            "timers_s": {name: round(t, 3) for name, t in top}}


def describe(phases: dict | None) -> str:
    """One line for a report: '41.2 s compiling: 12.0 s tracing, 28.9 s backend, ...'."""
    if not phases:
        return "nothing compiled"
    text = (f"{phases['compile_s']:.1f} s compiling: {phases['tracing_s']:.1f} s tracing, "
            f"{phases['backend_s']:.1f} s backend")
    if phases.get("saved_graph_loading_s"):
        text += f", {phases['saved_graph_loading_s']:.1f} s loading a saved graph"
    if phases.get("saved_graph_saving_s"):
        text += f", {phases['saved_graph_saving_s']:.1f} s saving the graph"
    if phases["cuda_graph_recording_s"]:
        text += f", {phases['cuda_graph_recording_s']:.1f} s recording CUDA graphs"
    if phases["cache_counts"]:
        text += " (" + ", ".join(f"{name.split('.')[-1]} {n}" for name, n in phases["cache_counts"].items()) + ")"
    return text
