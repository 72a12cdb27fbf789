"""Does a dynamic compile of a UNet get faster when the latent's sides are known multiples of 8?

  python benchmarks/dynamic_latent_study.py [--depth 2] [--variants static,dynamic,dynamic-blocks] [--json F]

Builds ComfyUI's SDXL UNet (random weights, fp16, on the GPU) with each transformer stack cut to
`--depth` blocks (0 keeps SDXL's own 2/10), calls it as the sampler does (CFG batch of 2) and
compiles it with diffboost's O3 inductor settings and channels-last convolutions, three ways:

- static: every size fixed (the speed a dynamic compile is measured against);
- dynamic: `dynamic=True`, the latent passed as it is: its height and width become symbols h, w,
  and every size after a stride-2 convolution is (h - 1) // 2 + 1, computed by the kernels at run time;
- dynamic-blocks: `dynamic=True`, the latent passed as a (batch, channels, h/8, 8, w/8, 8) view with
  the 8s static and put back together inside the graph: the sides are 8*h', 8*w', so the sizes after
  each downsampling are exact multiples and the kernels see aligned, simplified index arithmetic.

Each variant reports its first call, ms per call (median of 5 rounds of 10 calls), the relative
error against eager, and for the dynamic ones the graphs compiled while the size moves through
832x1216, 768x512, 512x768 and a batch of 4 (two images with CFG; 0 means no recompilation). One JSON line per variant.
`--index-math` counts the run-time divisions in the generated kernels (it runs on the CPU too);
`--stacks-every N` prints the main thread's stack every N seconds, to see where a compile that does not end is."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

SIZES = ((1216, 832), (512, 768), (768, 512))


def unet(depth: int, device, dtype):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from diffboost.bench.models import SDXL

    cfg = dict(SDXL)
    if depth:
        cfg.update(transformer_depth=[0, 0, depth, depth, depth, depth], transformer_depth_middle=depth,
                   transformer_depth_output=[0, 0, 0, depth, depth, depth, depth, depth, depth])
    torch.manual_seed(0)
    m = UNetModel(**cfg, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m


def call_inputs(device, dtype, h: int, w: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, h // 8, w // 8, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    c = torch.randn(batch, 77, 2048, generator=g).to(device, dtype)
    y = torch.randn(batch, 2816, generator=g).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last), t, c, y


def sampler_call(m):
    """m called as the sampler calls it: with a new transformer_options each call. The UNet writes
    into it, and writing into forward's shared default {} would fail a guard at the next call."""
    def call(x, t, c, y):
        return m(x, t, context=c, y=y, transformer_options={})
    return call


def variant_fn(name: str, m, settings: dict):
    """The variant's compiled call, traced as Compile Model traces: duck sizing off, so that a square
    latent's height and width stay two symbols and another aspect ratio does not recompile, and
    floats as constants, so that the model is traced once. The blocks are Compile Model's own
    (backends/latent_blocks.py)."""
    from diffboost.backends.inductor import with_floats_as_constants, without_duck_sizing
    from diffboost.backends.latent_blocks import LatentInBlocks, as_blocks

    def traced(fn):
        return without_duck_sizing(with_floats_as_constants(fn))

    if name in ("static", "dynamic"):
        return traced(torch.compile(sampler_call(m), dynamic=name == "dynamic", options=settings))
    compiled = traced(torch.compile(LatentInBlocks(m), dynamic=True, options=settings))

    def call(x, t, c, y):
        return compiled(as_blocks(x), t, context=c, y=y, transformer_options={})
    return call


def print_main_stack_every(seconds: float) -> None:
    """Print the main thread's stack to stderr every `seconds`, from a daemon thread. Python's own
    frames only: faulthandler's periodic dump crashed the process mid-compile."""
    main_id = threading.main_thread().ident

    def loop():
        start = time.perf_counter()
        while True:
            time.sleep(seconds)
            frame = sys._current_frames().get(main_id)
            lines = traceback.format_stack(frame) if frame else ["(no main thread)\n"]
            stack = "".join(lines[:6] + ["  ...\n"] + lines[-12:])  # the caller and where inside torch
            print(f"--- main thread at {time.perf_counter() - start:.0f} s\n{stack}", file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True).start()


def index_math(codes: list[str]) -> dict:
    """How much run-time index arithmetic inductor generated: floor divisions and modulos in the
    kernels (Triton's `//` and `%`, C++'s div_floor_integer and mod), and distinct size arguments."""
    text = "\n".join(codes)
    return {"floor_div": len(re.findall(r"div_floor_integer|//", text)),
            "mod": len(re.findall(r"\bmod\(| % ", text)),
            "size_args": len(set(re.findall(r"\bks\d+\b", text)))}


def timed(fn, args, rounds: int = 5, calls: int = 10, code: list | None = None):
    def once():
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args).clone()

    from diffboost.measure.timer import synchronize

    def sync():
        synchronize(args[0].device)

    sync()
    start = time.perf_counter()
    if code is None:
        out = once()
    else:  # the first call also returns the code inductor generated
        from torch._inductor.utils import run_and_get_code

        out, texts = run_and_get_code(once)
        code.extend(texts)
    sync()
    first = time.perf_counter() - start
    for _ in range(3):
        once()
    per = []
    for _ in range(rounds):
        sync()
        s = time.perf_counter()
        for _ in range(calls):
            out = once()
        sync()
        per.append((time.perf_counter() - s) / calls * 1000)
    return first, statistics.median(per), per, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--variants", default="static,dynamic,dynamic-blocks")
    p.add_argument("--json")
    p.add_argument("--cpu", action="store_true", help="a quick check of the script at 256x256, fp32")
    p.add_argument("--index-math", action="store_true",
                   help="count the floor divisions and modulos in the code inductor generates for each variant")
    p.add_argument("--stacks-every", type=float, default=0,
                   help="print the main thread's stack to stderr every N seconds: where a long compile spends its time")
    a = p.parse_args()
    from diffboost.backends.inductor import inductor_settings
    from diffboost.backends.modes import parse_mode
    from diffboost.backends.runtime import runtime_switches
    from diffboost.bench.host import boot
    from diffboost.measure.runner import dynamo_graph_count

    # SDPA on the CPU too, as on the GPU: the CPU default's graph breaks would hide the UNet's own kernels.
    boot(cpu=a.cpu, load_pack=False, sdpa_attention=True)
    device, dtype = (torch.device("cpu"), torch.float32) if a.cpu else (torch.device("cuda"), torch.float16)
    side = 256 if a.cpu else 1024
    mode = parse_mode("default" if a.cpu else "O3")
    settings = inductor_settings(mode, "channels_last")
    m = unet(a.depth, device, dtype)
    args = call_inputs(device, dtype, side, side)
    with torch.no_grad():
        ref = sampler_call(m)(*args).float()
        eager = timed(sampler_call(m), args)
    rows = [{"variant": "eager", "ms": round(eager[1], 3), "rounds": [round(v, 3) for v in eager[2]],
             "depth": a.depth, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "torch": torch.__version__}]
    print(json.dumps(rows[0]), flush=True)
    if a.stacks_every:
        print_main_stack_every(a.stacks_every)
    for name in a.variants.split(","):
        torch._dynamo.reset()
        row = {"variant": name, "depth": a.depth}
        try:
            fn = variant_fn(name, m, settings)
            with torch.no_grad(), runtime_switches(mode):
                code = [] if a.index_math else None
                first, ms, per, out = timed(fn, args, code=code)
                if code is not None:
                    row["index_math"] = index_math(code)
                row.update(first_call_s=round(first, 1), ms=round(ms, 3), rounds=[round(v, 3) for v in per],
                           rel_err=float((out.float() - ref).norm() / ref.norm()),
                           vs_eager=round(eager[1] / ms, 3))
                if name != "static":
                    # the speed first: a recompile over the sizes below may not end within a call's time
                    print(json.dumps({**row, "before_size_changes": True}), flush=True)
                    graphs = dynamo_graph_count()
                    for w, h in SIZES:
                        fn(*call_inputs(device, dtype, h * side // 1024 // 64 * 64, w * side // 1024 // 64 * 64))
                    fn(*call_inputs(device, dtype, side, side, batch=4))  # a sampler with CFG never calls with 1
                    row["graphs_after_size_changes"] = dynamo_graph_count() - graphs
        except Exception as e:  # recorded, so the next variant still runs
            row["error"] = f"{type(e).__name__}: {e}"[:800]
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
