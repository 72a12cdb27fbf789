"""FP8 Linear micro-benchmark: bf16 F.linear against diffboost's Fp8Linear on the Linear shapes of
Flux, SD3 and SDXL, eager and under torch.compile (where the activation quantization is fused into
the kernel that produces the activation: here a DiT-style modulation x * (1 + scale) + shift).

    python benchmarks/fp8_linear_bench.py                 # CUDA GPU with FP8 tensor cores (sm_89+)
    python benchmarks/fp8_linear_bench.py --tokens 4096 --types rowwise --no-compile
    python benchmarks/fp8_linear_bench.py --dry-run       # CPU: checks shapes, errors and the table code

Times are medians over --repeats measurements of --iters back-to-back calls, taken with CUDA
events after --warmup calls. TFLOP/s counts the matmul only (2*M*K*N). Relative error is
||y - y_ref|| / ||y_ref|| against a float32 F.linear on the same bf16 inputs and weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from diffboost.quant import Fp8Linear
from diffboost.quant.device import fp8_matmul_missing
from diffboost.quant.fp8 import quantize

# (K in_features, N out_features, where it occurs)
SHAPES = [
    (3072, 3072, "Flux attn out"),
    (3072, 12288, "Flux MLP up"),
    (12288, 3072, "Flux MLP down"),
    (1536, 1536, "SD3 attn out"),
    (1536, 6144, "SD3 MLP up"),
    (6144, 1536, "SD3 MLP down"),
    (1280, 1280, "SDXL attn proj"),
    (1280, 5120, "SDXL GEGLU half"),
    (5120, 1280, "SDXL FF down"),
]
TYPES = ("rowwise", "tensorwise", "weight_only")


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def time_ms(fn, warmup: int, iters: int, repeats: int) -> float:
    """Median milliseconds per call: CUDA events around `iters` calls, `repeats` times."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def modulate(x, scale, shift):
    return x * (1 + scale) + shift


def bench_shape(m: int, k: int, n: int, quant_types, args, device) -> list[dict]:
    """One row per quant type for an (M, K) x (K, N) product."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    scale = 0.1 * torch.randn(k, device=device, dtype=dtype)
    shift = 0.1 * torch.randn(k, device=device, dtype=dtype)
    h = modulate(x, scale, shift)
    ref = F.linear(h.float(), lin.weight.float(), lin.bias.float())
    flops = 2 * m * k * n
    tflops = (lambda ms: flops / ms / 1e9) if not args.dry_run else (lambda ms: float("nan"))
    timer = (lambda fn: time_ms(fn, args.warmup, args.iters, args.repeats)) if not args.dry_run \
        else (lambda fn: (fn(), float("nan"))[1])

    def bf16_step(x):
        return F.linear(modulate(x, scale, shift), lin.weight, lin.bias)

    with torch.inference_mode():
        bf16_eager = timer(lambda: F.linear(h, lin.weight, lin.bias))
        bf16_err = rel_error(F.linear(h, lin.weight, lin.bias), ref)
        bf16_compiled = float("nan")
        if args.compile:
            step = torch.compile(bf16_step, dynamic=False)
            bf16_compiled = timer(lambda: step(x))
        rows = []
        for t in quant_types:
            layer = Fp8Linear(lin, t, allow_reference_path=args.dry_run)
            layer.refresh(device)  # quantize the weight once, outside the timed region
            y = layer(h)
            row = {"M": m, "K": k, "N": n, "type": t, "kernel": layer.kernel,
                   "bf16_eager": tflops(bf16_eager), "bf16_compiled": tflops(bf16_compiled),
                   "fp8_eager": tflops(timer(lambda layer=layer: layer(h))),
                   "fp8_compiled": float("nan"), "fp8_mm_only": float("nan"),
                   "err_fp8": rel_error(y, ref), "err_fp8_compiled": float("nan"), "err_bf16": bf16_err}
            if args.compile:
                def fp8_step(x, layer=layer):
                    return layer(modulate(x, scale, shift))

                step = torch.compile(fp8_step, dynamic=False)
                row["err_fp8_compiled"] = rel_error(step(x), ref)
                row["fp8_compiled"] = tflops(timer(lambda step=step: step(x)))
            if layer.kernel == "scaled_mm":  # the ceiling: the FP8 matmul alone, activations quantized beforehand
                granularity = "row" if t == "rowwise" else "tensor"
                hq, h_scale = quantize(h, granularity)
                w_scale = layer.weight_scale.reshape(1, -1) if t == "rowwise" else layer.weight_scale
                row["fp8_mm_only"] = tflops(timer(lambda hq=hq, h_scale=h_scale, w_scale=w_scale, layer=layer: (
                    torch._scaled_mm(hq, layer.weight_fp8.t(), scale_a=h_scale, scale_b=w_scale,
                                     bias=layer.bias, out_dtype=torch.bfloat16, use_fast_accum=True))))
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("M", 6, "{}"), ("K", 6, "{}"), ("N", 6, "{}"), ("type", 12, "{}"), ("bf16_eager", 10, "{:.1f}"),
            ("bf16_compiled", 13, "{:.1f}"), ("fp8_eager", 9, "{:.1f}"), ("fp8_compiled", 12, "{:.1f}"),
            ("fp8_mm_only", 11, "{:.1f}"), ("speedup", 7, "{:.2f}"), ("err_fp8", 8, "{:.4f}"),
            ("err_fp8_compiled", 16, "{:.4f}"), ("err_bf16", 8, "{:.4f}")]
    print("TFLOP/s of the matmul (2*M*K*N / time); speedup = fp8_compiled / bf16_compiled "
          "(both with the modulation fused in); errors relative to a float32 F.linear")
    print(" ".join(name.rjust(width) for name, width, _ in cols))
    for r in rows:
        r = {**r, "speedup": r["fp8_compiled"] / r["bf16_compiled"] if r["bf16_compiled"] else float("nan")}
        print(" ".join(fmt.format(r[name]).rjust(width) for name, width, fmt in cols))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="M: rows (tokens x batch)")
    p.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    p.add_argument("--shapes", default="all", help="'all', or comma-separated KxN such as 3072x12288,1536x1536")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, small sizes, no timing: checks the script itself (add --no-compile to skip inductor)")
    args = p.parse_args(argv)

    shapes = [(k, n) for k, n, _ in SHAPES] if args.shapes == "all" else \
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.dry_run:
        # Small shapes; with compile (inductor on the CPU is slow) only one of them.
        device, tokens = torch.device("cpu"), [64]
        shapes = [(k // 8, n // 8) for k, n in shapes[:1 if args.compile else 3]]
    else:
        if not torch.cuda.is_available():
            print("This benchmark needs a CUDA GPU; use --dry-run to check it on the CPU.", file=sys.stderr)
            return 2
        device, tokens = torch.device("cuda"), args.tokens
        missing = fp8_matmul_missing(device)
        if missing and any(t != "weight_only" for t in args.types):
            print(f"FP8 matmuls cannot run here: {missing}", file=sys.stderr)
            return 2
        # Each shape and type is its own graph of the same function: keep them all compiled.
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1024)
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16 inputs")

    rows = []
    for m in tokens:
        for k, n in shapes:
            rows.extend(bench_shape(m, k, n, args.types, args, device))
            print_table(rows[-len(args.types):])
            sys.stdout.flush()
    print("\nAll shapes:")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
