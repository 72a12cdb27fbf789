"""How long torch.dynamo takes to trace each architecture's denoiser: the part of a compile that no
artifact cache removes (a warm start still traces, then loads the compiled kernels).

  python benchmarks/trace_study.py [--models sdxl,sd3,flux,pixart] [--variants whole,dynamic,regional,whole-filtered]

Runs on the CPU with the models on the meta device (real architectures and shapes, no weights, no
memory), through ComfyUI's SDPA attention path as on a GPU. The backend does no compiling: the first
call's time is dynamo's tracing and guard building, which depend on the Python code traced, not on the
device. 1024x1024 latents, batch 2 (cond and uncond) as the samplers call it; Flux batch 1."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

VARIANTS = ("whole", "dynamic", "regional", "whole-filtered")


def build(name: str):
    """(denoiser on the meta device, its call's keyword arguments)."""
    import comfy.ops

    from diffboost.bench import models as M

    ops, dt = comfy.ops.disable_weight_init, torch.bfloat16

    def empty(*shape):
        return torch.empty(*shape, device="meta", dtype=dt)

    if name == "sdxl":
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        net = UNetModel(**M.SDXL, dtype=dt, device="meta", operations=ops)
        kwargs = {"x": empty(2, 4, 128, 128), "timesteps": empty(2), "context": empty(2, 77, 2048), "y": empty(2, 2816)}
    elif name == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

        net = OpenAISignatureMMDITWrapper(**M.SD3, dtype=dt, device="meta", operations=ops)
        kwargs = {"x": empty(2, 16, 128, 128), "timesteps": empty(2), "context": empty(2, 154, 4096),
                  "y": empty(2, 2048)}
    elif name == "flux":
        from comfy.ldm.flux.model import Flux

        net = Flux(**{k: v for k, v in M.FLUX.items() if k != "image_model"}, dtype=dt, device="meta", operations=ops)
        kwargs = {"x": empty(1, 16, 128, 128), "timestep": empty(1), "context": empty(1, 256, 4096), "y": empty(1, 768),
                  "guidance": empty(1)}
    elif name == "pixart":
        from comfy.ldm.pixart.pixartms import PixArtMS

        net = PixArtMS(**{k: v for k, v in M.PIXART.items() if k != "image_model"}, dtype=dt, device="meta",
                       operations=ops)
        kwargs = {"x": empty(2, 4, 128, 128), "timesteps": empty(2), "context": empty(2, 120, 4096),
                  "c_size": empty(2, 2), "c_ar": empty(2, 1)}
    else:
        raise ValueError(f"model {name}: sdxl, sd3, flux or pixart")
    return net.eval(), kwargs


def trace(net, kwargs: dict, variant: str) -> dict:
    from torch._dynamo.utils import compilation_time_metrics as phases

    from diffboost.backends import CompileOptions
    from diffboost.backends.inductor import keep_transformer_options_unguarded, layout_key
    from diffboost.backends.standin import repeated_blocks, replace_submodules, twin_calling

    torch._dynamo.reset()
    graphs: list[int] = []

    def no_compile(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    if variant == "regional":  # one compile per block class and layout, as diffboost's `regional` flag
        contexts = {}

        def compile_block(m):
            key = layout_key(m, CompileOptions())
            if key not in contexts:
                contexts[key] = torch.compile(m, backend=no_compile).dynamo_ctx
            return contexts[key](m)

        blocks = repeated_blocks(net)
        fn = replace_submodules(net, lambda name, m: twin_calling(m, compile_block(m)) if type(m) in blocks else None)
    else:
        # whole-filtered: with the guard filter diffboost's compiles pass (its own cost is torch building
        # one filter entry per guard).
        options = {"guard_filter_fn": keep_transformer_options_unguarded} if variant == "whole-filtered" else {}
        fn = torch.compile(net, backend=no_compile, dynamic=True if variant == "dynamic" else None, options=options)
    def seconds(phase: str) -> float:
        return sum(phases.get(phase, []))

    before = {phase: seconds(phase) for phase in ("bytecode_tracing", "build_guards")}
    with torch.no_grad():
        start = time.perf_counter()
        fn(**kwargs, transformer_options={})  # a fresh dict per call, as ComfyUI passes it
        first = time.perf_counter() - start
        start = time.perf_counter()
        fn(**kwargs, transformer_options={})
        second = time.perf_counter() - start
    return {"variant": variant, "first_call_s": round(first, 2), "second_call_s": round(second, 3),
            "graphs": len(graphs), "fx_nodes": sum(graphs),
            "bytecode_tracing_s": round(seconds("bytecode_tracing") - before["bytecode_tracing"], 2),
            "build_guards_s": round(seconds("build_guards") - before["build_guards"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sdxl,sd3,flux,pixart")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from diffboost.bench.host import comfy_path

    sys.path.insert(0, str(comfy_path()))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True  # ComfyUI's choice on a GPU: torch SDPA
    rows = []
    for name in args.models.split(","):
        net, kwargs = build(name)
        params = sum(p.numel() for p in net.parameters()) / 1e9
        for variant in args.variants.split(","):
            row = {"model": name, "params_billions": round(params, 2), **trace(net, kwargs, variant)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | variant | first call (tracing) | graphs | FX nodes | bytecode tracing | guards |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['first_call_s']:.1f} s | {r['graphs']} | {r['fx_nodes']} | "
              f"{r['bytecode_tracing_s']:.1f} s | {r['build_guards_s']:.1f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
