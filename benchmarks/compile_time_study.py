"""Where a cold compile's time goes, and which of inductor's settings shorten it without slowing the step.

  python benchmarks/compile_time_study.py --model sdxl --dtype fp16 --variant diffboost-O3 \\
      --knobs 'as-is,pattern_matcher=0,shape_padding=0' [--runs 2] [--json F]

Each knob set runs in a new process with empty inductor, Triton and diffboost caches: the cold start of
Compile Model's first compile (with its compile cache on, as the node's default). The process runs
`diffboost-bench` with eager and the variant, inductor's process-wide settings changed as the knob set
says (`name=value`, several joined by `+`; what the variant's mode sets itself wins over them).
Prints, per knob set: first call, compile phases, it/s, error against eager, and torch's compile timers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def parse_knobs(text: str) -> dict:
    """'pattern_matcher=0+triton.autotune_pointwise=0' -> {'pattern_matcher': '0', ...}; 'as-is' -> {}."""
    if text == "as-is":
        return {}
    knobs = {}
    for part in text.split("+"):
        name, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"knob '{part}' needs a value: write NAME=VALUE, e.g. pattern_matcher=0")
        knobs[name.strip()] = value.strip()
    return knobs


def apply_knobs(knobs: dict) -> None:
    """Set inductor's settings, each value converted to the type of the setting it replaces."""
    from torch._inductor import config

    for name, text in knobs.items():
        *path, leaf = name.split(".")
        owner = functools.reduce(getattr, path, config)
        current = getattr(owner, leaf)  # an unknown name fails here, before anything runs
        if isinstance(current, bool):
            value = text in ("1", "true", "True")
        elif current is None:
            value = text
        else:
            value = type(current)(text)
        setattr(owner, leaf, value)


def child(knobs: str, bench_args: list[str]) -> None:
    apply_knobs(parse_knobs(knobs))
    from diffboost.bench import cli

    cli.main(bench_args)


def run_one(knobs: str, args, scratch: Path) -> dict:
    folder = scratch / knobs.replace("/", "_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
           "TRITON_CACHE_DIR": str(folder / "triton"), "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "0"}
    out = folder / "bench.json"
    bench = ["--model", args.model, "--steps", str(args.steps), "--runs", str(args.runs),
             "--variants", f"eager,{args.variant}", "--compile-cache", str(folder / "diffboost"), "--json", str(out)]
    if args.dtype:
        bench += ["--dtype", args.dtype]
    print(f"\n=== {knobs}", flush=True)
    done = subprocess.run([sys.executable, __file__, "--child", knobs, "--", *bench], env=env)
    if done.returncode != 0 or not out.is_file():
        return {"knobs": knobs, "ok": False, "error": f"exit code {done.returncode}"}
    eager, compiled = json.loads(out.read_text())["variants"]
    return {"knobs": knobs, "ok": compiled["ok"], "eager_it_per_s": eager["it_per_s"], **compiled}


def report(rows: list[dict]) -> None:
    print("\n| knobs | first call | compile: tracing / backend | saving the graph | it/s | vs eager | rel. err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["ok"]:
            print(f"| {r['knobs']} | failed: {r.get('error')} | | | | | |")
            continue
        p = r["stats"]["first_call_compile"] or {}
        phases = f"{p.get('tracing_s', 0):.1f} / {p.get('backend_s', 0):.1f} s"
        print(f"| {r['knobs']} | {r['first_call_s']:.1f} s | {phases} | {p.get('saved_graph_saving_s', 0):.1f} s "
              f"| {r['it_per_s']:.2f} | {r['speedup_vs_eager']:.2f}x | {r['rel_err_vs_eager']:.1e} |")
    timed = [r for r in rows if r["ok"] and r["stats"]["first_call_compile"]]
    if not timed:
        return
    names = list(timed[0]["stats"]["first_call_compile"]["timers_s"])
    print("\n| torch's timer (s) | " + " | ".join(r["knobs"] for r in timed) + " |")
    print("|---|" + "---|" * len(timed))
    for name in names:
        cells = [f"{r['stats']['first_call_compile']['timers_s'].get(name, 0):.1f}" for r in timed]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--dtype", default=None)
    p.add_argument("--variant", default="diffboost-O3")
    p.add_argument("--knobs", default="as-is", help="comma-separated knob sets; 'as-is' changes nothing")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    for knobs in args.knobs.split(","):
        parse_knobs(knobs)  # a typo fails now, not after the first cold compile
    rows = []
    with tempfile.TemporaryDirectory(prefix="compile-time-study-") as scratch:
        for knobs in args.knobs.split(","):
            rows.append(run_one(knobs, args, Path(scratch)))
            if args.json:  # after each knob set: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=1))
    report(rows)


if __name__ == "__main__":
    main()
