"""How much FP8 can give a whole denoiser step, at most: every Linear call of one step at 1024x1024
(its M x K x N, from a forward of the real architecture on the meta device, batch as the samplers
call it), timed on the GPU in bf16 and as FP8 `torch._scaled_mm` with row-wise scales.

    python benchmarks/fp8_floor.py --models sdxl,sd3,flux --step-ms sdxl=32.75,sd3=38.5,flux=126.4
    python benchmarks/fp8_floor.py --models sdxl --shapes-only      # CPU: the Linear calls of a step
    python benchmarks/fp8_floor.py --models sdxl --layers linear,conv --step-ms sdxl=32.75   # convolutions too

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


def record_calls(net, kwargs, layers, key_of) -> tuple[Counter, dict]:
    """(Counter of key_of(module, input) -> calls in one forward of `net`, one module name per key), over
    the (qualname, module) pairs of `layers`."""
    calls: Counter = Counter()
    example: dict = {}
    hooks = []
    for qualname, layer in layers:
        def record(module, args, qualname=qualname):
            key = key_of(qualname, module, args[0])
            calls[key] += 1
            example.setdefault(key, qualname)
        hooks.append(layer.register_forward_pre_hook(record))
    with torch.no_grad():
        net(**kwargs, transformer_options={})
    for h in hooks:
        h.remove()
    return calls, example


def linear_calls(name: str) -> tuple[Counter, dict]:
    """(Counter of (M, K, N, has_bias, quantized by default) -> calls per denoiser call, one module
    name per key), from a forward of the real architecture on the meta device."""
    from diffboost.quant import DEFAULT_IGNORE, QuantConfig, choose_layers
    from diffboost.quant.select import linear_layers

    net, kwargs = build(name)
    chosen = choose_layers(net, QuantConfig.from_user("rowwise", ignore=DEFAULT_IGNORE)).quantized

    def key_of(qualname, module, x):
        return (x.numel() // module.in_features, module.in_features, module.out_features, module.bias is not None,
                qualname in chosen)
    return record_calls(net, kwargs, linear_layers(net), key_of)


def conv_calls(name: str) -> tuple[Counter, dict]:
    """(Counter of (batch, C, H, W, O, kh, kw, stride, padding) -> calls per denoiser call, one module
    name per key), from a forward of the real architecture on the meta device."""
    net, kwargs = build(name)
    convs = [(q, m) for q, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]

    def key_of(qualname, module, x):
        return (*x.shape, module.out_channels, *module.kernel_size, module.stride[0], module.padding[0])
    return record_calls(net, kwargs, convs, key_of)


def im2col(x: torch.Tensor, kh: int, kw: int, stride: int, padding: int) -> torch.Tensor:
    """(batch * H_out * W_out, kh * kw * C) rows of a channels-last (B, C, H, W) input, kernel position
    major and channel minor, matching `conv_weight_matrix`."""
    x = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))
    b, h, w, c = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    taps = [x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] for i in range(kh) for j in range(kw)]
    return torch.cat(taps, dim=-1).reshape(b * ho * wo, kh * kw * c)


def conv_weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """(O, kh * kw * C) of a (O, C, kh, kw) convolution weight, in `im2col`'s column order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def time_conv(b: int, c: int, h: int, w: int, o: int, kh: int, kw: int, stride: int, padding: int, args) -> dict:
    """Milliseconds of one convolution: cuDNN in half precision, the FP8 matmul over its im2col matrix
    alone, and building that matrix (quantized) from the half-precision input."""
    from diffboost.quant.fp8 import quantize

    dev, dt = torch.device("cuda"), torch.float16  # the UNets' compiled step runs in fp16
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, device=dev, dtype=dt).to(memory_format=torch.channels_last)
    weight = (torch.randn(o, c, kh, kw, device=dev, dtype=dt) / (c * kh * kw) ** 0.5).to(
        memory_format=torch.channels_last)
    bias = torch.randn(o, device=dev, dtype=dt)
    cols_q, cols_s = quantize(im2col(x, kh, kw, stride, padding), "row")
    wq, ws = quantize(conv_weight_matrix(weight), "row")
    ws = ws.reshape(1, -1)
    torch._dynamo.reset()
    build_cols = torch.compile(lambda t: quantize(im2col(t, kh, kw, stride, padding), "row"), dynamic=False)

    def fp8():
        return torch._scaled_mm(cols_q, wq.t(), scale_a=cols_s, scale_b=ws, bias=bias, out_dtype=dt,
                                use_fast_accum=True)

    timer = lambda fn: graph_time_ms(fn, args.warmup, args.iters, args.repeats)  # noqa: E731
    with torch.inference_mode():
        ref = F.conv2d(x.float(), weight.float(), bias.float(), stride, padding)
        out = fp8().float().reshape(b, ref.shape[2], ref.shape[3], o).permute(0, 3, 1, 2)
        err = float((out - ref).norm() / ref.norm())
        return {"half_ms": timer(lambda: F.conv2d(x, weight, bias, stride, padding)), "fp8_mm_ms": timer(fp8),
                "im2col_ms": timer(lambda: build_cols(x)), "fp8_rel_err": err}


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
    p.add_argument("--layers", default="linear", help="linear, conv or linear,conv")
    p.add_argument("--shapes-only", action="store_true", help="list the layer calls; no GPU needed")
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
    layers = set(args.layers.split(","))
    if not layers <= {"linear", "conv"}:
        raise SystemExit(f"--layers {args.layers}: name linear, conv or both (linear,conv)")
    report = {}
    for name in args.models.split(","):
        report[name] = {"step_ms": step_ms.get(name)}
        if "linear" in layers:
            report[name]["rows"] = linear_rows(name, args)
            print_model(name, report[name]["rows"], step_ms.get(name))
        if "conv" in layers:
            report[name]["conv_rows"] = conv_rows(name, args)
            print_convs(name, report[name]["conv_rows"], step_ms.get(name))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def add_timing(row: dict, measure, *args) -> None:
    """`row` updated with `measure(*args)`'s timings, or with its error for a shape the GPU's kernels refuse."""
    try:
        row.update(measure(*args))
    except RuntimeError as e:  # e.g. a shape torch._scaled_mm does not take
        row["error"] = str(e).splitlines()[0][:200]


def linear_rows(name: str, args) -> list[dict]:
    calls, example = linear_calls(name)
    rows = []
    for (m, k, n, bias, chosen), count in sorted(calls.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]
                                                 * kv[1]):
        row = {"M": m, "K": k, "N": n, "bias": bias, "calls": count, "fp8_by_default": chosen,
               "example": example[(m, k, n, bias, chosen)], "gflop": 2 * m * k * n * count / 1e9}
        if not args.shapes_only and k % 16 == 0 and n % 16 == 0:
            add_timing(row, time_call, m, k, n, bias, args)
        rows.append(row)
        print(json.dumps({"model": name, **row}), flush=True)
    return rows


def conv_rows(name: str, args) -> list[dict]:
    calls, example = conv_calls(name)
    rows = []
    for key, count in sorted(calls.items(), key=lambda kv: -conv_gflop(kv[0]) * kv[1]):
        b, c, h, w, o, kh, kw, stride, padding = key
        row = {"batch": b, "C": c, "H": h, "W": w, "O": o, "kernel": kh, "stride": stride, "padding": padding,
               "calls": count, "example": example[key], "gflop": conv_gflop(key) * count}
        if not args.shapes_only and (c * kh * kw) % 16 == 0 and o % 16 == 0:
            add_timing(row, time_conv, *key, args)
        rows.append(row)
        print(json.dumps({"model": name, **row}), flush=True)
    return rows


def conv_gflop(key: tuple) -> float:
    b, c, h, w, o, kh, kw, stride, padding = key
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    return 2 * b * ho * wo * c * kh * kw * o / 1e9


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


def print_convs(name: str, rows: list[dict], step: float | None) -> None:
    print(f"\n### {name}: convolutions\n")
    print("| B x C x H x W -> O, kernel / stride | calls a step | example | half ms a step | FP8 matmul ms a step | "
          "im2col ms a step | FP8 alone vs half | FP8 rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = (f"{r['batch']} x {r['C']} x {r['H']} x {r['W']} -> {r['O']}, "
                 f"{r['kernel']}x{r['kernel']} / {r['stride']}")
        c = r["calls"]
        if "half_ms" not in r:
            print(f"| {shape} | {c} | `{r['example']}` | {r.get('error', 'not timed')} | | | | |")
            continue
        print(f"| {shape} | {c} | `{r['example']}` | {r['half_ms'] * c:.3f} | {r['fp8_mm_ms'] * c:.3f} | "
              f"{r['im2col_ms'] * c:.3f} | {r['half_ms'] / r['fp8_mm_ms']:.2f}x | {r['fp8_rel_err']:.3f} |")
    timed = [r for r in rows if "half_ms" in r]
    if not timed:
        return
    half = sum(r["half_ms"] * r["calls"] for r in timed)
    saved_free = sum((r["half_ms"] - r["fp8_mm_ms"]) * r["calls"] for r in timed)
    saved_best = sum(max(0.0, r["half_ms"] - r["fp8_mm_ms"]) * r["calls"] for r in timed)
    saved_im2col = sum(max(0.0, r["half_ms"] - r["fp8_mm_ms"] - r["im2col_ms"]) * r["calls"] for r in timed)
    line = (f"- FP8 for every convolution: they take {half:.2f} ms a step in half precision; an FP8 kernel at "
            f"cuBLAS's FP8 rate saves at most {saved_free:.2f} ms ({saved_best:.2f} ms keeping the shapes it "
            f"slows in half precision); the im2col route saves {saved_im2col:.2f} ms (only where it gains)")
    if step:
        line += (f"; a {step:.2f} ms compiled step would become at best {step - saved_best:.2f} ms: "
                 f"**{step / (step - saved_best):.3f}x** ({step / (step - saved_im2col):.3f}x by im2col)")
    print(line)


if __name__ == "__main__":
    raise SystemExit(main())
