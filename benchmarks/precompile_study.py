"""Can a new process skip dynamo's trace? torch's ahead-of-time compile of a denoiser, saved to a
file in one process and loaded in another, against the usual compile.

  python benchmarks/precompile_study.py save --model sdxl --dir DIR [--dtype fp16] [--res 1024]
  python benchmarks/precompile_study.py load --model sdxl --dir DIR

`save` builds the random-weight model (seeded), calls the bare denoiser as ComfyUI's sampler does
(CFG batch of 2, conditioning of the architecture's shapes), times eager, compiles the call ahead
of time with inductor (`torch.compile(...).aot_compile`, whole graph, the O3 inductor settings),
saves it to DIR, and times the compiled call; with `--regular`, the usual torch.compile of the
same settings too. `load` is meant for a new process with an empty inductor cache: it builds the
same model, loads the saved function and reports the load time, the first call, the speed and the
error against eager on the same inputs, and whether the saved guards reject a changed input.
Each phase prints one JSON line (and appends it to DIR/study.jsonl); an exception is recorded,
not raised, so every later phase still runs."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch


def inputs(name: str, device: torch.device, dtype: torch.dtype, res: int, batch: int = 2) -> dict:
    """Seeded keyword arguments of one denoiser call at `res` pixels (latent res/8)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    side = res // 8
    if name in ("sdxl", "sd15", "tiny-sd15"):
        kw = {"x": r(batch, 4, side, side), "timesteps": torch.full((batch,), 500.0, device=device),
              "context": r(batch, 77, 2048 if name == "sdxl" else 768)}
        if name == "sdxl":
            kw["y"] = r(batch, 2816)
    elif name == "sd3":
        kw = {"x": r(batch, 16, side, side), "timesteps": torch.full((batch,), 500.0, device=device),
              "context": r(batch, 154, 4096), "y": r(batch, 2048)}
    elif name == "flux":
        kw = {"x": r(1, 16, side, side), "timestep": torch.full((1,), 0.5, device=device),
              "context": r(1, 256, 4096), "y": r(1, 768), "guidance": torch.full((1,), 3.5, device=device)}
    else:
        raise ValueError(f"model {name}: sdxl, sd15, tiny-sd15, sd3 or flux")
    kw["transformer_options"] = {}
    return kw


def settings(device: torch.device) -> dict:
    """The inductor settings of diffboost's O3 preset on this device."""
    from diffboost.backends.inductor import inductor_settings
    from diffboost.backends.modes import parse_mode

    return inductor_settings(parse_mode("O3" if device.type == "cuda" else "default"))


def timed(fn, kw: dict, device: torch.device, runs: int) -> tuple[float, list[float], torch.Tensor]:
    """(first call s, later calls ms, output of the last call)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = fn(**kw)
        sync()
        first = time.perf_counter() - start
        ms = []
        for _ in range(runs):
            start = time.perf_counter()
            out = fn(**kw)
            sync()
            ms.append((time.perf_counter() - start) * 1e3)
    return first, ms, out.detach().clone()


def error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.float().flatten(), ref.float().flatten()
    rel = ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=0).item()
    return {"rel_err": float(f"{rel:.3g}"), "cosine": round(cos, 6), "nan": bool(torch.isnan(out).any())}


def timers() -> dict:
    """torch's own compile timers so far in this process (seconds)."""
    from torch._dynamo.utils import compilation_time_metrics as phases

    keys = ("bytecode_tracing", "build_guards", "fullgraph_capture")
    return {f"{k}_s": round(sum(phases.get(k, [])), 2) for k in keys}


def record(directory: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(directory / "study.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def attempt(directory: Path, phase: str, body) -> dict | None:
    try:
        row = {"phase": phase, **body()}
    except Exception as e:  # a study: report what failed and go on
        row = {"phase": phase, "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
    record(directory, row)
    return row


def build(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffboost.bench import models

    model = models.build(name, device, dtype)
    net = model.patcher.model.diffusion_model
    return net.to(device).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=["save", "load"])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--dir", required=True)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--res", type=int, default=None)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--regular", action="store_true", help="also time the usual torch.compile (save phase)")
    p.add_argument("--plain", action="store_true", help="run the host's casting layers as plain torch layers")
    args = p.parse_args()

    from diffboost.bench.host import comfy_path

    sys.path.insert(0, str(comfy_path()))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True  # ComfyUI's choice on a GPU: one graph
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    res = args.res or (1024 if device.type == "cuda" else 128)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    saved = directory / f"{args.model}_{args.dtype}_{res}{'_plain' if args.plain else ''}.aot"

    net = build(args.model, device, dtype)
    if args.plain:
        from diffboost.backends.plain_layers import plain_stand_in
        from diffboost.backends.standin import replace_submodules

        net = replace_submodules(net, lambda name, m: plain_stand_in(m))
        if net.__dict__.get("dtype") is not None:
            # Read only in __init__. torch's guard serializer records an unread attribute as missing by
            # its id, and a dtype is a singleton: every saved tensor's dtype would come back missing.
            net = copy.copy(net)
            del net.__dict__["dtype"]
    kw = inputs(args.model, device, dtype, res)
    forward = type(net).forward
    record(directory, {"phase": f"{args.phase}: setup", "torch": torch.__version__, "device": str(device),
                       "model": args.model, "res": res, "dtype": args.dtype, "plain": args.plain,
                       "has_aot_compile": hasattr(torch.compiler, "load_compiled_function")})
    first, ms, ref = timed(lambda **k: net(**k), kw, device, args.runs)
    record(directory, {"phase": f"{args.phase}: eager", "first_s": round(first, 2),
                       "ms_per_call": round(statistics.median(ms), 2)})

    def bound(fn):
        return lambda **k: fn(net, **k)

    if args.phase == "save":
        state: dict = {}

        def compile_ahead():
            start = time.perf_counter()
            if hasattr(torch._dynamo.config, "enable_aot_compile"):
                torch._dynamo.config.enable_aot_compile = True  # off by default in some torch releases
            compiled = torch.compile(forward, fullgraph=True, options=settings(device))
            with torch.no_grad():  # the sampler calls the denoiser without autograd; so is the graph traced
                state["fn"] = compiled.aot_compile(((net,), kw))
            return {"compile_s": round(time.perf_counter() - start, 2), **timers()}

        def save():
            start = time.perf_counter()
            state["fn"].save_compiled_function(str(saved))
            return {"save_s": round(time.perf_counter() - start, 2), "bytes": saved.stat().st_size}

        def run(fn_key: str):
            def body():
                first, ms, out = timed(bound(state[fn_key]), kw, device, args.runs)
                return {"first_s": round(first, 2), "ms_per_call": round(statistics.median(ms), 2), **error(out, ref)}
            return body

        attempt(directory, "save: aot_compile", compile_ahead)
        if "fn" in state:
            attempt(directory, "save: write", save)
            attempt(directory, "save: run the ahead-of-time function", run("fn"))
        if args.regular:
            def regular():
                torch._dynamo.reset()
                compiled = torch.compile(net, options=settings(device))
                first, ms, out = timed(lambda **k: compiled(**k), kw, device, args.runs)
                return {"first_s": round(first, 2), "ms_per_call": round(statistics.median(ms), 2), **error(out, ref)}
            attempt(directory, "save: usual torch.compile, same settings", regular)
        return

    state = {}

    def load():
        start = time.perf_counter()
        with open(saved, "rb") as f:
            state["fn"] = torch.compiler.load_compiled_function(f)
        return {"load_s": round(time.perf_counter() - start, 2)}

    def run():
        first, ms, out = timed(bound(state["fn"]), kw, device, args.runs)
        return {"first_s": round(first, 2), "ms_per_call": round(statistics.median(ms), 2), **error(out, ref)}

    def guards():
        other = dict(kw, x=kw["x"][:1], context=kw["context"][:1], y=kw["y"][:1]) if "y" in kw else \
            dict(kw, x=kw["x"][:1], context=kw["context"][:1])
        if "timesteps" in other:
            other["timesteps"] = kw["timesteps"][:1]
        fn = state["fn"]
        with torch.no_grad():
            return {"accepts_same_inputs": bool(fn.guard_check(net, **kw)),
                    "accepts_batch_1": bool(fn.guard_check(net, **other)),
                    "accepts_patch_in_transformer_options": bool(fn.guard_check(
                        net, **dict(kw, transformer_options={"patches_replace": {"attn2": {}}})))}

    attempt(directory, "load: load_compiled_function", load)
    if "fn" in state:
        attempt(directory, "load: run the loaded function", run)
        attempt(directory, "load: guard checks", guards)


if __name__ == "__main__":
    main()
