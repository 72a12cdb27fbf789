"""Attention kernels on the attention shapes of the supported models at 1024x1024: flash, memory-efficient
and cuDNN scaled-dot-product attention, TFLOP/s and error against a float32 reference.

  python benchmarks/attention_bench.py [--json PATH] [--compiled]

--compiled also checks which kernel torch.compile keeps when diffboost's `cudnn-attention` flag is on
(the backend is chosen when the graph is traced), by profiling a compiled SDPA call.

Shapes are (batch, heads, tokens, head dim) as ComfyUI calls SDPA (CFG doubles SDXL's, SD3's and
PixArt's batch)."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffboost.measure.compare import relative_error

SHAPES = {
    "Flux-dev (4096 image + 512 text tokens)": (1, 24, 4608, 128),
    "SD3-medium (4096 + 154 tokens)": (2, 24, 4250, 64),
    "PixArt-alpha self-attention": (2, 16, 4096, 72),
    "SDXL level 2 self-attention": (2, 10, 4096, 64),
    "SDXL level 3 self-attention": (2, 20, 1024, 64),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def compiled_kernels(shape=(2, 24, 4250, 64)) -> list[dict]:
    """Compile an SDPA call with and without the cuDNN-first priority and name the attention kernel
    each compiled graph launches, with its time."""
    from diffboost.backends.runtime import _prefer_cudnn_attention

    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = []
    for label, context in (("default priority", None), ("cudnn-attention", _prefer_cudnn_attention)):
        torch._dynamo.reset()  # dynamo does not guard on the SDPA priority: trace afresh
        fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v) * 2)
        cm = context() if context else contextlib.nullcontext()
        with cm:
            fn(q, k, v)
        ms = time_ms(lambda fn=fn: fn(q, k, v))  # outside the context: the compiled graph keeps its choice
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(q, k, v)
            torch.cuda.synchronize()
        names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
        attn = [n for n in names if any(w in n.lower() for w in ("flash", "fmha", "cudnn", "attn", "sm90"))]
        rows.append({"compiled": label, "ms": round(ms, 4), "kernels": attn or names[:6]})
        print(f"compiled SDPA {shape}, {label:17} {ms:8.3f} ms  kernels: {attn or names[:6]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--compiled", action="store_true", help="also profile compiled SDPA with cudnn-attention")
    p.add_argument("--only-compiled", action="store_true", help="skip the eager kernel table")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"default SDPA priority {torch._C._get_sdp_priority_order()}")
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for where, (b, h, n, d) in ({} if args.only_compiled else SHAPES).items():
        for dtype in (torch.bfloat16, torch.float16):
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            flop = 4 * b * h * n * n * d
            for name, backend in BACKENDS.items():
                row = {"shape": where, "dims": [b, h, n, d], "dtype": str(dtype).split(".")[-1], "backend": name}
                try:
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(q, k, v)
                        ms = time_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
                    err = relative_error(out, ref)
                    row.update(ms=round(ms, 4), tflops=round(flop / ms / 1e9, 1), rel_err=err)
                except Exception as e:  # a backend that does not take this shape is a row too
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                print(f"{where:42} {row['dtype']:9} {name:9} " + (
                    f"{row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s  rel err {row['rel_err']:.2e}"
                    if "ms" in row else row["error"]), flush=True)
    if args.compiled or args.only_compiled:
        rows += compiled_kernels()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
