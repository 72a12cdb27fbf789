"""Attention kernels on the attention shapes of the supported models at 1024x1024: flash, memory-efficient
and cuDNN scaled-dot-product attention, TFLOP/s and error against a float32 reference.

  python benchmarks/attention_bench.py [--json PATH] [--fa4 | --only-fa4]

--fa4 adds FlashAttention's CuTe kernels (flash-attn-4, where installed) beside torch's, eager and
inside a compiled CUDA graph.

Shapes are (batch, heads, tokens, head dim) as ComfyUI calls SDPA (CFG doubles SDXL's, SD3's and
PixArt's batch)."""

from __future__ import annotations

import argparse
import functools
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


def fa4_rows(shapes: dict) -> list[dict]:
    """FlashAttention's CuTe kernels against torch's SDPA on each shape, both given ComfyUI's layout:
    (batch, tokens, heads, head dim) from the projections, which SDPA reads through a transposed view;
    then each inside a compiled graph with CUDA graphs (the way Compile Model's O3 runs them)."""
    from diffboost.backends.flash_attention import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"fa4: {reason}")
        return [{"backend": "fa4", "error": reason}]
    g = torch.Generator(device="cuda").manual_seed(0)
    return [row for where, dims in shapes.items() for row in fa4_shape_rows(where, *dims, g)]


def fa4_shape_rows(where: str, b: int, h: int, n: int, d: int, g: torch.Generator) -> list[dict]:
    from diffboost.backends.flash_attention import flash_attention

    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    t = [x.transpose(1, 2) for x in (q, k, v)]  # SDPA's (batch, heads, tokens, dim) view, as ComfyUI calls it
    ref = F.scaled_dot_product_attention(*(x.float() for x in t)).transpose(1, 2)
    flop, scale = 4 * b * h * n * n * d, d ** -0.5

    def sdpa(x):  # ComfyUI's call: a (batch, tokens, heads, dim) tensor through SDPA's layout and back
        return F.scaled_dot_product_attention(*(x.transpose(1, 2),) * 3).transpose(1, 2)

    def fa4(x):
        return flash_attention(x, x, x, scale)

    def block(x, attn):  # a norm before and a residual after, as around a DiT's attention
        return x + attn(F.layer_norm(x, x.shape[-1:]).view(b, n, h, d)).reshape(b, n, h * d)

    rows = []
    kernels = {"sdpa (torch's choice)": lambda: F.scaled_dot_product_attention(*t).transpose(1, 2),
               "fa4": lambda: flash_attention(q, k, v, scale)}
    for name, fn in kernels.items():
        rows.append(_timed_row({"shape": where, "dims": [b, h, n, d], "backend": name}, fn, ref, flop))
    x = torch.randn(b, n, h * d, device="cuda", dtype=torch.bfloat16, generator=g)
    eager = block(x, sdpa)
    for name, attn in (("compiled, CUDA graphs: sdpa", sdpa), ("compiled, CUDA graphs: fa4", fa4)):
        torch._dynamo.reset()
        fn = torch.compile(functools.partial(block, attn=attn), mode="reduce-overhead", fullgraph=True)
        rows.append(_timed_row({"shape": where, "dims": [b, h, n, d], "backend": name},
                               lambda fn=fn: fn(x).clone(), eager, flop))
    return rows


def _timed_row(row: dict, fn, ref: torch.Tensor, flop: int) -> dict:
    """Time `fn` and compare its output with `ref`; a failure is a row too."""
    label = f"{row['shape']:42} {row.get('dtype', ''):9} {row['backend']:30}"
    try:
        for _ in range(3):  # the first calls build kernels and record CUDA graphs
            out = fn()
        ms = time_ms(fn)
        row.update(ms=round(ms, 4), tflops=round(flop / ms / 1e9, 1), rel_err=relative_error(out, ref))
        print(f"{label} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s  rel err {row['rel_err']:.2e}", flush=True)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{label} {row['error']}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--fa4", action="store_true", help="FlashAttention's CuTe kernels beside SDPA")
    p.add_argument("--only-fa4", action="store_true", help="only the flash-attn-4 comparison")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"default SDPA priority {torch._C._get_sdp_priority_order()}")
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for where, (b, h, n, d) in ({} if args.only_fa4 else SHAPES).items():
        for dtype in (torch.bfloat16, torch.float16):
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            flop = 4 * b * h * n * n * d
            for name, backend in BACKENDS.items():
                row = {"shape": where, "dims": [b, h, n, d], "dtype": str(dtype).split(".")[-1], "backend": name}
                with sdpa_kernel([backend]):  # a backend that does not take this shape is a row too
                    rows.append(_timed_row(row, lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                                           ref, flop))
    if args.fa4 or args.only_fa4:
        rows += fa4_rows(SHAPES)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
