"""How much FP8 can give a whole denoiser step, at most: every Linear call of one step at 1024x1024
(its M x K x N, from a forward of the real architecture on the meta device, batch as the samplers
call it), timed on the GPU in bf16 and as FP8 `torch._scaled_mm` with row-wise scales.

    python benchmarks/fp8_floor.py --models sdxl,sd3,flux --step-ms sdxl=32.75,sd3=38.5,flux=126.4
    python benchmarks/fp8_floor.py --models sdxl --shapes-only      # CPU: the Linear calls of a step

For each distinct call it times, as GPU time inside a CUDA graph (the compiled step replays one too):
bf16 `F.linear` (cuBLAS), the FP8 matmul alone with its activation quantized beforehand (the
ceiling: quantization for free), and the activation's row-wise quantization as its own compiled
kernel (what it costs when inductor cannot fuse it into the kernel before). The step's ceiling with
FP8 is the measured bf16 step (`--step-ms`, a compiled step from benchmarks/RESULTS.md) minus what
the FP8 matmuls save over the bf16 ones: everything else (convolutions, attention, norms) unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_study import build  # noqa: E402


def graph_time_ms(fn, warmup: int, iters: int, repeats: int) -> float:
    """Median GPU milliseconds per call of `fn`, `iters` calls captured in one CUDA graph and replayed
    `repeats` times: the kernels' own time, without the Python and launch overhead of each call (which
    the compiled step, itself replayed as a CUDA graph, does not pay either)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return sorted(samples)[len(samples) // 2]


def linear_calls(name: str) -> tuple[Counter, dict]:
    """(Counter of (M, K, N, has_bias, quantized by default) -> calls per denoiser call, one module
    name per key), from a forward of the real architecture on the meta device."""
    from diffboost.quant import DEFAULT_IGNORE, QuantConfig, choose_layers
    from diffboost.quant.select import linear_layers

    net, kwargs = build(name)
    chosen = choose_layers(net, QuantConfig.from_user("rowwise", ignore=DEFAULT_IGNORE)).quantized
    calls: Counter = Counter()
    example: dict = {}
    hooks = []
    for qualname, layer in linear_layers(net):
        def record(module, args, qualname=qualname):
            rows = args[0].numel() // module.in_features
            key = (rows, module.in_features, module.out_features, module.bias is not None, qualname in chosen)
            calls[key] += 1
            example.setdefault(key, qualname)
        hooks.append(layer.register_forward_pre_hook(record))
    with torch.no_grad():
        net(**kwargs, transformer_options={})
    for h in hooks:
        h.remove()
    return calls, example


def time_call(m: int, k: int, n: int, bias: bool, args) -> dict:
    """Milliseconds of one (M, K) x (K, N) product: bf16, FP8 matmul alone, and the quantization pass."""
    from diffboost.quant.fp8 import quantize

    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
    b = torch.randn(n, device=dev, dtype=dt) if bias else None
    xq, xs = quantize(x, "row")
    wq, ws = quantize(w, "row")
    ws = ws.reshape(1, -1)
    torch._dynamo.reset()  # one compile per shape, never dynamo's recompile limit (it would fall back to eager)
    quantize_compiled = torch.compile(lambda t: quantize(t, "row"), dynamic=False)

    def fp8():
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=dt, use_fast_accum=True)

    timer = lambda fn: graph_time_ms(fn, args.warmup, args.iters, args.repeats)  # noqa: E731
    with torch.inference_mode():
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        err = float((fp8().float() - ref).norm() / ref.norm())
        return {"bf16_ms": timer(lambda: F.linear(x, w, b)), "fp8_mm_ms": timer(fp8),
                "quantize_ms": timer(lambda: quantize_compiled(x)), "fp8_rel_err": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sdxl,sd3,flux")
    p.add_argument("--step-ms", default="", help="measured compiled bf16 step per model: sdxl=32.75,sd3=38.5")
    p.add_argument("--shapes-only", action="store_true", help="list the Linear calls; no GPU needed")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    step_ms = {k: float(v) for k, v in (s.split("=") for s in args.step_ms.split(",") if s)}

    from diffboost.bench.host import comfy_path

    sys.path.insert(0, str(comfy_path()))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # the models run on the meta device; the GEMMs below go to CUDA directly
    comfy.cli_args.args.use_pytorch_cross_attention = True
    report = {}
    for name in args.models.split(","):
        calls, example = linear_calls(name)
        rows = []
        for (m, k, n, bias, chosen), count in sorted(calls.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]
                                                     * kv[1]):
            row = {"M": m, "K": k, "N": n, "bias": bias, "calls": count, "fp8_by_default": chosen,
                   "example": example[(m, k, n, bias, chosen)], "gflop": 2 * m * k * n * count / 1e9}
            if not args.shapes_only and k % 16 == 0 and n % 16 == 0:
                try:
                    row.update(time_call(m, k, n, bias, args))
                except RuntimeError as e:  # e.g. a shape torch._scaled_mm does not take
                    row["error"] = str(e).splitlines()[0][:200]
            rows.append(row)
            print(json.dumps({"model": name, **row}), flush=True)
        report[name] = {"rows": rows, "step_ms": step_ms.get(name)}
        print_model(name, rows, step_ms.get(name))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def print_model(name: str, rows: list[dict], step: float | None) -> None:
    print(f"\n### {name}\n")
    print("| M x K x N | calls a step | example | FP8 by default | bf16 ms a step | FP8 matmul ms a step | "
          "quantize ms a step | FP8 alone vs bf16 | FP8 rel. err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "bf16_ms" not in r:
            if "error" in r:
                print(f"| {r['M']} x {r['K']} x {r['N']} | {r['calls']} | `{r['example']}` | | {r['error']} |")
                continue
            print(f"| {r['M']} x {r['K']} x {r['N']} | {r['calls']} | `{r['example']}` | "
                  f"{'yes' if r['fp8_by_default'] else 'no'} | | | | | |")
            continue
        c = r["calls"]
        print(f"| {r['M']} x {r['K']} x {r['N']} | {c} | `{r['example']}` | {'yes' if r['fp8_by_default'] else 'no'} "
              f"| {r['bf16_ms'] * c:.3f} | {r['fp8_mm_ms'] * c:.3f} | {r['quantize_ms'] * c:.3f} | "
              f"{r['bf16_ms'] / r['fp8_mm_ms']:.2f}x | {r['fp8_rel_err']:.3f} |")
    timed = [r for r in rows if "bf16_ms" in r]
    if not timed:
        return
    bf16 = sum(r["bf16_ms"] * r["calls"] for r in timed)
    for label, subset in (("the layers Quantize FP8 picks by default", [r for r in timed if r["fp8_by_default"]]),
                          ("every Linear", timed)):
        saved_free = sum((r["bf16_ms"] - r["fp8_mm_ms"]) * r["calls"] for r in subset)
        saved_paid = sum((r["bf16_ms"] - r["fp8_mm_ms"] - r["quantize_ms"]) * r["calls"] for r in subset)
        line = (f"- FP8 for {label}: the Linear calls take {bf16:.2f} ms a step in bf16; FP8 saves at most "
                f"{saved_free:.2f} ms (quantization free), {saved_paid:.2f} ms (quantization as its own kernel)")
        if step:
            line += (f"; a {step:.2f} ms compiled bf16 step would become at best {step - saved_free:.2f} ms: "
                     f"**{step / (step - saved_free):.3f}x** ({step / (step - saved_paid):.3f}x)")
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
