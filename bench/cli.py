"""diffboost-bench: compare ways of running one diffusion model side by side in one process
(eager, ComfyUI's compile, diffboost's presets, FP8), through ComfyUI's own sampling.

  diffboost-bench                                   # SDXL on a GPU, tiny SD1.5 on a CPU
  diffboost-bench --model flux --res 1024 --steps 20 --variants eager,comfy-compile,diffboost-O3
  diffboost-bench --model tiny-sd15 --steps 2 --runs 2 --json out.json --plot out.png
  diffboost-bench --model sd3 --variants eager,diffboost-O3 --profile prof/   # where each step's time goes
  diffboost-bench --model sdxl --variants eager,diffboost-O3 --restart          # cold and warm start
  diffboost-bench --server http://127.0.0.1:8188 --ckpt sd_xl_base_1.0.safetensors

Every figure comes from the Benchmark Sampler's measuring function (diffboost.nodes.benchmark_sampler)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from ..measure.runner import Reporter
from ..measure.stats import format_bytes, format_table

JSON_FIELDS = ("variant", "ok", "error", "it_per_s", "speedup_vs_eager", "run_s", "first_call_s", "peak_mem_bytes",
               "recompiles", "tflops", "fraction_of_peak", "rel_err_vs_eager", "cosine_vs_eager",
               "one_call_rel_err_vs_eager", "one_call_cosine_vs_eager", "model_state", "profile")
# One denoiser call, compared on its own: one euler step from the middle of the schedule (denoise 0.5
# of 2 steps) returns the model's denoised prediction there, CFG included.
ONE_CALL_DENOISE = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffboost-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="sdxl | sd3 | flux | pixart | sd15 | tiny-sd15 (random weights). "
                   "Default: sdxl on a GPU, tiny-sd15 on a CPU")
    p.add_argument("--ckpt", default=None, help="a checkpoint or diffusion-model file instead of random weights "
                   "(with --server: a checkpoint name the server lists)")
    p.add_argument("--variants", default=None, help="comma-separated; default: every default variant. "
                   "--list-variants shows them")
    p.add_argument("--list-variants", action="store_true", help="list the variants and whether each can run here")
    p.add_argument("--res", type=int, default=None, help="image size in pixels (square); default per model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="timed runs per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (the first one compiles)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="simple")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cfg", type=float, default=None, help="default: the architecture's usual value")
    p.add_argument("--vram", default="normal", choices=["normal", "lowvram", "novram"],
                   help="ComfyUI's memory mode (its --lowvram / --novram): checks that variants survive "
                        "partial loading")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="weights dtype (random models)")
    p.add_argument("--json", default=None, metavar="PATH", help="write one record per variant")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw a PNG chart")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after each variant's timed runs, one more run under torch.profiler: kernel time per "
                        "step by kind (matmul, attention, fused, ...) and device idle time, printed and written "
                        "to DIR/<variant>.md and the JSON; the timeline to DIR/<variant>.trace.json.gz")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="diffboost's variants keep their compiled artifacts in DIR and load them from there "
                        "(Compile Model's compile_cache); default: no persistent cache")
    p.add_argument("--restart", action="store_true",
                   help="then measure the variants again in a new process whose inductor cache is empty, so "
                        "that only the compile cache can help: the warm start, as rows 'VARIANT (restart)' "
                        "beside the cold ones (uses a temporary --compile-cache when none is given)")
    p.add_argument("--server", default=None, metavar="URL", help="run against a running ComfyUI through its HTTP API")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait per variant with --server")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.runs < 1 or args.warmup < 0 or args.batch < 1:
        print("diffboost-bench: --steps, --runs and --batch must be 1 or more, --warmup 0 or more", file=sys.stderr)
        return 2
    if args.server and (args.profile or args.restart or args.compile_cache):
        print("diffboost-bench: --profile, --restart and --compile-cache run the model in this process; they do "
              "not work with --server (the server's Compile Model nodes have their own compile_cache)",
              file=sys.stderr)
        return 2
    from . import variants as registry

    if args.list_variants:
        return _list_variants(registry)
    try:
        chosen = registry.select(args.variants)
    except ValueError as e:
        print(f"diffboost-bench: {e}", file=sys.stderr)
        return 2
    own_cache = args.restart and not args.compile_cache
    if own_cache:
        args.compile_cache = tempfile.mkdtemp(prefix="diffboost-bench-cache-")
    registry.COMPILE_CACHE_DIR = args.compile_cache
    if args.server:
        from .remote import run_remote

        rows, header = run_remote(args, chosen)
    else:
        try:
            rows, header = run_in_process(args, chosen)
            if args.restart:
                rows += restarted_rows(args, [v.name for v in chosen if v.cached])
        finally:
            if own_cache:  # only this run could use it
                shutil.rmtree(args.compile_cache, ignore_errors=True)
    add_comparisons(rows)
    print()
    print(header)
    print(results_table(rows))
    print(first_call_lines(rows))
    if args.json:
        write_json(args.json, header, rows)
        print(f"wrote {args.json}")
    if args.plot:
        from .plot import plot_rows

        plot_rows(rows, args.plot, title=header)
        print(f"wrote {args.plot}")
    return 0 if any(r["ok"] for r in rows) else 1


def restarted_rows(args, cached: list[str]) -> list[dict]:
    """The `cached` variants (those diffboost compiles) measured by a new process with an empty inductor
    cache and this run's compile cache, as rows named 'VARIANT (restart)' (its eager row only served
    its own comparisons). The others have nothing in that cache: a restart would only compile them again."""
    if not cached:
        print("\nrestart: skipped, no variant of this run is compiled by diffboost", flush=True)
        return []
    child = [sys.executable, "-m", "diffboost.bench", "--compile-cache", args.compile_cache,
             "--variants", ",".join(["eager", *cached])]
    for flag in ("model", "ckpt", "res", "steps", "batch", "runs", "warmup", "sampler", "scheduler",
                 "seed", "cfg", "vram", "dtype"):
        value = getattr(args, flag)
        if value is not None:
            child += [f"--{flag}", str(value)]
    with tempfile.TemporaryDirectory(prefix="diffboost-bench-restart-") as scratch:
        out = os.path.join(scratch, "restart.json")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(scratch, "inductor"))
        print(f"\nrestart: the same variants in a new process, compile cache {args.compile_cache}, "
              "empty inductor cache", flush=True)
        done = subprocess.run([*child, "--json", out], env=env)
        if done.returncode != 0 or not os.path.exists(out):
            error = f"the restarted process exited with {done.returncode}"
            return [{"variant": "(restart)", "ok": False, "error": error, "model_state": ""}]
        with open(out) as f:
            records = json.load(f)["variants"]
    return [{**r, "variant": f"{r['variant']} (restart)"} for r in records if r["variant"] != "eager"]


def write_json(path: str, header: str, rows: list[dict]) -> None:
    """The rows (with add_comparisons already applied) and the run's setup line, as JSON."""
    with open(path, "w") as f:
        json.dump({"setup": header, "variants": [_json_record(r) for r in rows]}, f, indent=2)


def _list_variants(registry) -> int:
    for name, v in registry.VARIANTS.items():
        try:
            reason = v.unavailable()
        except Exception as e:  # a broken availability check is itself a reason
            reason = f"{type(e).__name__}: {e}"
        flag = "default" if v.default else "       "
        print(f"{name:22} {flag}  {v.summary}" + (f"  [unavailable: {reason}]" if reason else ""))
    return 0


def run_in_process(args, chosen) -> tuple[list[dict], str]:
    """Boot ComfyUI here, build the model once, and measure every variant on its own clone."""
    from tqdm import tqdm

    from .host import boot, comfy_kitchen_version

    host = boot(vram=args.vram)
    import torch

    from ..nodes.benchmark_sampler import measure_sampling
    from . import models

    device = host.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    if args.ckpt:
        bm = models.load_checkpoint(args.ckpt, seed=args.seed)
    else:
        bm = models.build(args.model or models.default_model(device), device, dtype=dtype, seed=args.seed)
    if args.cfg is not None:
        bm.cfg = args.cfg
    res = args.res or models.default_resolution(bm.name)
    if bm.name in ("sdxl", "pixart"):  # size conds should say the size actually sampled
        bm.positive, bm.negative = models.conditioning(bm.name, seed=args.seed, res=res)
    latent = {"samples": torch.zeros(args.batch, bm.latent_channels, res // 8, res // 8)}
    header = (f"{bm.description}, {res}x{res}, batch {args.batch}, {args.steps} steps {args.sampler}/{args.scheduler}, "
              f"cfg {bm.cfg}, {args.warmup} warm-up + {args.runs} timed runs, device {_device_name(device)}")
    if args.vram != "normal":
        header += f", ComfyUI memory mode {host.mm.vram_state.name}"
    kitchen = comfy_kitchen_version()
    header += f", comfy_kitchen {kitchen}" if kitchen else ", without comfy_kitchen"
    print(header)
    if kitchen is None:
        print("note: this ComfyUI has no comfy_kitchen, which ComfyUI's requirements install: its eager Flux "
              "then computes RoPE with slower functions, and every ratio to eager on Flux is higher than in "
              "a ComfyUI installed as its users install it (pip install comfy-kitchen)", flush=True)
    rows = []
    bar = tqdm(chosen, desc="variants", unit="variant")
    for variant in bar:
        bar.set_postfix_str(variant.name)
        row = {"variant": variant.name, "ok": False, "error": None}
        rows.append(row)
        reason = variant.unavailable()
        if reason:
            row["error"] = f"skipped: {reason}"
            continue
        model = None
        try:
            model = variant.apply(bm.patcher, bm)
            reporter = _TqdmReporter(variant.name, (args.warmup + args.runs) * args.steps)
            try:
                out, stats = measure_sampling(model, args.seed, args.steps, bm.cfg, args.sampler, args.scheduler,
                                              bm.positive, bm.negative, latent, 1.0, args.warmup, args.runs,
                                              reporter=reporter, where=f"diffboost-bench variant {variant.name}")
            finally:
                reporter.close()
            row.update(_row_from_stats(stats.as_dict()))
            row["latent"] = out["samples"].detach().float().cpu()
            if args.vram != "normal":  # how much of the model partial loading left on the GPU
                print(f"{variant.name}: {model.loaded_size() / max(model.model_size(), 1):.0%} of the weights "
                      "were on the GPU while sampling", flush=True)
            one, _ = measure_sampling(model, args.seed, 1, bm.cfg, "euler", "simple", bm.positive, bm.negative,
                                      latent, ONE_CALL_DENOISE, 0, 1, where=f"diffboost-bench variant {variant.name}")
            row["one_call"] = one["samples"].detach().float().cpu()
            row["ok"] = True
            if args.profile:
                row["profile"] = _profile_variant(args, variant.name, model, bm, latent, device)
        except Exception as e:  # one variant's failure (e.g. a compile error) is its row, not the end
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            tqdm.write(f"{variant.name} failed:\n{traceback.format_exc(limit=3)}")
        finally:
            del model
            _release(host)
        if args.json:  # after every variant, so a run cut short keeps what it measured
            add_comparisons(rows)
            write_json(args.json, header, rows)
    return rows, header


def _profile_variant(args, name: str, model, bm, latent, device) -> dict:
    """One more sampling run of the variant under torch.profiler; prints and writes where its time went."""
    from pathlib import Path

    from ..measure.profile import profile_run
    from ..nodes.benchmark_sampler import measure_sampling

    def run():
        measure_sampling(model, args.seed, args.steps, bm.cfg, args.sampler, args.scheduler, bm.positive,
                         bm.negative, latent, 1.0, 0, 1, where=f"diffboost-bench variant {name} (profiled)")

    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    profile = profile_run(run, args.steps, device, trace_path=str(folder / f"{stem}.trace.json.gz"))
    text = f"## {name}: one run of {args.steps} steps under torch.profiler ({device})\n\n{profile.table()}\n"
    text += "\n| kernel | kind | ms per step | calls per step |\n|---|---|---|---|\n"
    text += "".join(f"| `{n[:90]}` | {c} | {ms:.3f} | {calls:.1f} |\n" for n, c, ms, calls in profile.top)
    path = folder / f"{stem}.md"
    path.write_text(text)
    print(f"\n{text}wrote {path}", flush=True)
    return profile.as_dict()


def _release(host) -> None:
    """Free what one variant held before the next starts, so variants do not see each other."""
    import torch

    host.mm.unload_all_models()
    host.mm.soft_empty_cache()
    torch._dynamo.reset()  # compiled code of one variant must not serve (or count against) the next


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def _row_from_stats(d: dict) -> dict:
    return {"it_per_s": d["it_per_s"], "run_s": d["run_s"], "first_call_s": d["first_call_s"],
            "peak_mem_bytes": d["peak_mem_bytes"], "recompiles": d["recompiles"], "tflops": d["tflops"],
            "fraction_of_peak": d["fraction_of_peak"], "model_state": d["model_state"], "stats": d}


def add_comparisons(rows: list[dict]) -> None:
    """Speed-up over eager, and the relative error and cosine against eager's of the final latent and
    of one denoiser call."""
    from ..measure.compare import cosine_similarity, relative_error

    eager = next((r for r in rows if r["variant"] == "eager" and r["ok"]), None)
    for r in rows:
        r.setdefault("speedup_vs_eager", None)
        r.setdefault("rel_err_vs_eager", None)
        r.setdefault("cosine_vs_eager", None)
        r.setdefault("one_call_rel_err_vs_eager", None)
        r.setdefault("one_call_cosine_vs_eager", None)
        if not r["ok"] or eager is None:
            continue
        if r.get("it_per_s") and eager.get("it_per_s"):
            r["speedup_vs_eager"] = round(r["it_per_s"] / eager["it_per_s"], 4)
        for output, prefix in (("latent", ""), ("one_call", "one_call_")):
            if r.get(output) is not None and eager.get(output) is not None:
                r[f"{prefix}rel_err_vs_eager"] = _finite(relative_error(r[output], eager[output]))
                r[f"{prefix}cosine_vs_eager"] = _finite(cosine_similarity(r[output], eager[output]))


def results_table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table = []
    for r in rows:
        if not r["ok"]:
            table.append((r["variant"], "FAILED" if not str(r["error"]).startswith("skipped") else "skipped",
                          "", "", "", "", "", "", "", "", "", r["error"][:90]))
            continue
        frac = r.get("fraction_of_peak")
        table.append((r["variant"], fmt(r["it_per_s"], ".3f"), fmt(r["speedup_vs_eager"], ".2f") + "x",
                      fmt(r["first_call_s"], ".2f"), format_bytes(r["peak_mem_bytes"]), r["recompiles"],
                      fmt(r["tflops"], ".2f") + ("" if frac is None else f" ({frac * 100:.0f}%)"),
                      fmt(r["rel_err_vs_eager"], ".2e"), fmt(r["cosine_vs_eager"], ".6f"),
                      fmt(r.get("one_call_rel_err_vs_eager"), ".2e"), fmt(r.get("one_call_cosine_vs_eager"), ".6f"),
                      r["model_state"][:60]))
    headers = ["variant", "it/s", "vs eager", "first call s", "peak mem", "recompiles", "TFLOP/s (% peak)",
               "rel err", "cosine", "1-call rel err", "1-call cosine", "model"]
    return format_table(headers, table)


def first_call_lines(rows: list[dict]) -> str:
    """Where each variant's first call spent its compile time (torch's own timers)."""
    from ..measure.compile_phases import describe

    lines = ["first call:"]
    for r in rows:
        if r["ok"] and r.get("stats"):
            compiled = describe(r["stats"].get("first_call_compile"))
            lines.append(f"  {r['variant']}: {r['first_call_s']:.1f} s, {compiled}")
    return "\n".join(lines)


def _json_record(r: dict) -> dict:
    rec = {k: r.get(k) for k in JSON_FIELDS}
    rec["stats"] = r.get("stats")
    return rec


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else v


class _TqdmReporter(Reporter):
    """Steps of all runs of one variant as a tqdm bar; the first call's running time as its postfix."""

    def __init__(self, name: str, total_steps: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, desc=f"  {name}", unit="step", leave=False)
        self.started = time.perf_counter()

    def run_started(self, run, kind, total_runs):
        self.bar.set_postfix_str(f"{kind} {run + 1}/{total_runs}")

    def step_done(self, run, step, steps):
        self.bar.update(1)

    def first_call_tick(self, elapsed_s):
        self.bar.set_postfix_str(f"first call (compiling?) {elapsed_s:.0f} s", refresh=True)

    def run_finished(self, stats):
        pass

    def close(self):
        self.bar.close()
