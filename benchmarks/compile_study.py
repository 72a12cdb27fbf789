"""GPU study for the compile engine: every variant of one model in one process, side by side with
ComfyUI eager and ComfyUI's own compile, through comfy.sample.sample (the KSampler path).

Usage (on the GPU machine, ComfyUI in COMFYUI_PATH, the pack importable as `diffboost`):
  python benchmarks/compile_study.py MODEL VARIANT[,VARIANT...] [--steps 20] [--res 1024] [--dtype fp16]
MODEL: sdxl | sd3 | flux | pixart. VARIANT: eager | eager-bf16 | comfy-compile | NAME=MODE[/cl][/fuse][/dyn]
(e.g. opt-cg=max-optimize:low-precision:cudagraphs/cl). Rows are printed and appended to $OUT/study.jsonl
as each variant finishes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.environ.get("COMFYUI_PATH", os.path.abspath(".comfyui")))
import comfy.cli_args  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True
import comfy.model_detection  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
from comfy_api.torch_helpers import set_torch_compile_wrapper  # noqa: E402

from diffboost.backends import CompileCache, CompileOptions  # noqa: E402
from diffboost.nodes.patching import compiled_of, with_boost  # noqa: E402

DEV = mm.get_torch_device()
CONFIGS = {
    "sdxl": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False},
    "sd3": {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
            "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 1536}},
            "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": []},
    "flux": {"image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
             "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 3072,
             "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "depth": 19, "depth_single_blocks": 38,
             "guidance_embed": True},
}


def conds(name, res):
    g = torch.Generator().manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if name == "sdxl":
        extra = {"pooled_output": r(1, 1280), "width": res, "height": res, "crop_w": 0, "crop_h": 0,
                 "target_width": res, "target_height": res}
        return [[r(1, 77, 2048), dict(extra)]], [[r(1, 77, 2048), dict(extra)]], 4, 7.0
    if name == "sd3":
        return ([[r(1, 154, 4096), {"pooled_output": r(1, 2048)}]],
                [[r(1, 154, 4096), {"pooled_output": r(1, 2048)}]], 16, 5.0)
    if name == "flux":
        return ([[r(1, 256, 4096), {"pooled_output": r(1, 768), "guidance": 3.5}]],
                [[r(1, 256, 4096), {"pooled_output": r(1, 768), "guidance": 3.5}]], 16, 1.0)
    raise ValueError(name)


def build(name, dtype):
    cfg = dict(CONFIGS[name], dtype=dtype)
    mc = comfy.model_detection.model_config_from_unet_config(cfg)
    mc.set_inference_dtype(dtype, None)
    with torch.device(DEV):
        model = mc.get_model({}, "", device=DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for n, p in model.diffusion_model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif n.endswith("weight") or n.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=DEV, offload_device=torch.device("cpu"))


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def sample(mp, name, res, steps, seed=1):
    pos, neg, ch, cfg = conds(name, res)
    latent = torch.zeros(1, ch, res // 8, res // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    sync()
    t = time.perf_counter()
    out = comfy.sample.sample(mp, noise, steps, cfg, "euler", "simple", pos, neg, latent, seed=seed, disable_pbar=True)
    sync()
    return time.perf_counter() - t, out.float().cpu()


def profile_step(mp, name, res, out_dir):
    """Kernel time of one sampling step by category (eager), to see where a step goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sample(mp, name, res, 1)
    cats: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if t <= 0:
            continue
        k = e.key.lower()
        cat = ("attention" if any(w in k for w in ("flash", "fmha", "attention", "sdpa")) else
               "conv" if any(w in k for w in ("conv", "implicit", "cudnn", "xmma", "sm90_xmma")) else
               "gemm" if any(w in k for w in ("gemm", "cutlass", "matmul", "nvjet", "sm90")) else
               "norm" if "norm" in k else "copy/layout" if any(w in k for w in ("copy", "transpose", "nchw", "nhwc"))
               else "elementwise/other")
        cats[cat] = cats.get(cat, 0.0) + t / 1e3
        rows.append((t / 1e3, e.count, e.key[:110]))
    total = sum(cats.values())
    print(f"profile of one step ({total:.1f} ms of kernels incl. 1-step overheads):", flush=True)
    for c, t in sorted(cats.items(), key=lambda x: -x[1]):
        print(f"  {c:18} {t:8.1f} ms  {100 * t / total:5.1f}%")
    for t, n, k in sorted(rows, reverse=True)[:25]:
        print(f"  {t:8.2f} ms {n:5}x {k}")
    with open(os.path.join(out_dir, f"profile_{name}.json"), "w") as f:
        json.dump({"categories_ms": cats, "top": sorted(rows, reverse=True)[:80]}, f)


def eager_channels_last(m):
    """Study only: weights and input in channels_last, eager (changes the shared module in place)."""
    from comfy.patcher_extension import WrappersMP

    m.model.diffusion_model.to(memory_format=torch.channels_last)

    def wrapper(executor, x, *args, **kwargs):
        return executor(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "study-cl", wrapper)
    return m


def make_variant(mp, spec, cache=None):
    m = mp.clone()
    if spec in ("eager", "eager-bf16"):
        return m
    if spec == "eager-cl":
        return eager_channels_last(m)
    if spec == "comfy-compile":
        set_torch_compile_wrapper(m, backend="inductor", options={
            "guard_filter_fn": lambda g: [("transformer_options" not in e.name) for e in g]})
        return m
    mode, *flags = spec.split("/")
    options = CompileOptions.from_user("inductor", mode, "channels_last" if "cl" in flags else "preserve",
                                       "on" if "dyn" in flags else "auto", "fuse" in flags, "fail")
    return with_boost(m, compile_options=options, compile_cache=cache)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("variants")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", default=None, help="diffboost compile cache folder (default: no cache)")
    a = ap.parse_args()
    out_dir = os.environ.get("OUT", "/tmp")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    print(torch.__version__, torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", flush=True)
    models = {}
    ref = None
    rows = []
    for item in a.variants.split(","):
        label, _, spec = item.partition("=")
        spec = spec or label
        dtype = torch.bfloat16 if spec == "eager-bf16" else dtypes[a.dtype]
        if dtype not in models:
            models.clear()
            mm.unload_all_models()
            mm.soft_empty_cache()
            models[dtype] = build(a.model, dtype)
            mm.load_models_gpu([models[dtype]])
        if spec == "profile":
            try:
                profile_step(models[dtype], a.model, a.res, out_dir)
            except Exception:
                traceback.print_exc()
            continue
        row = {"model": a.model, "variant": label, "spec": spec, "dtype": str(dtype), "res": a.res, "steps": a.steps}
        try:
            m = make_variant(models[dtype], spec, CompileCache(a.cache) if a.cache else None)
            first, _ = sample(m, a.model, a.res, 2)
            row["first_call_s"] = round(first, 2)
            times = []
            for _ in range(a.runs):
                el, out = sample(m, a.model, a.res, a.steps)
                times.append(el)
            med = statistics.median(times)
            row.update(it_s=round(a.steps / med, 3), sample_s=round(med, 3),
                       spread_s=round(max(times) - min(times), 3),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV.type == "cuda" else None)
            c = compiled_of(m)
            if c is not None:
                row["graphs"] = c.stats.graphs_compiled
                row["compile_s"] = round(c.stats.compile_seconds, 1)
                row["cache"] = c.stats.cache
            if ref is None:
                ref = out
                row["ref"] = True
            else:
                row["rel_err_vs_ref"] = float((out - ref).norm() / ref.norm())
                row["cos_vs_ref"] = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
                row["nan"] = bool(torch.isnan(out).any())
        except Exception as e:
            traceback.print_exc()
            row["error"] = repr(e)[:400]
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(os.path.join(out_dir, "study.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if spec == "eager-cl":
            models[dtype].model.diffusion_model.to(memory_format=torch.contiguous_format)
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
    print("\nvariant                 it/s   first_call_s  graphs  rel_err    peak_GiB")
    for r in rows:
        print(f"{r['variant']:22} {r.get('it_s', '-'):>6} {r.get('first_call_s', '-'):>12} {r.get('graphs', '-'):>7} "
              f"{r.get('rel_err_vs_ref', '-')!s:>10.8} {r.get('peak_gib', '-')}  {r.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
