"""How fast inductor's kernels for the FP8 activation quantization are, against the same producer
(GELU, layer norm with modulation, Flux's concatenation) without quantization, under inductor settings.

    python benchmarks/quantize_kernel_study.py [--configs default,multi_kernel,...] [--json F]

Each case is compiled alone (`torch.compile`, static shapes) and timed as GPU time inside a CUDA graph
(as the compiled step runs). The quantization is diffboost's own (`diffboost.quant.fp8.quantize`,
row-wise), the producers are the layers in front of the FP8 Linears of SD3 and Flux at 1024x1024.
Bandwidth counts each input read once and each output written once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_floor import graph_time_ms  # noqa: E402

from diffboost.quant.fp8 import quantize  # noqa: E402
from diffboost.quant.kernels import gelu_quantize_rows  # noqa: E402

CONFIGS = {
    "default": {},
    "multi_kernel": {"triton.multi_kernel": 1},  # persistent and looped reductions both, picked at run time
    "persistent": {"triton.multi_kernel": 2},  # inductor's setting that forces persistent reductions (rows to 16K)
    "looped": {"triton.multi_kernel": 3},  # ... and the one that forces looped ones
    "no_persistent": {"triton.persistent_reductions": False},
}


def gelu_cases(dev):
    h = torch.randn(8192, 6144, device=dev, dtype=torch.bfloat16)  # SD3 fc1's output, batch 2
    return {"SD3 GELU (8192 x 6144) -> fc2": (lambda h: F.gelu(h, approximate="tanh"), (h,),
                                              lambda h: gelu_quantize_rows(h, 0))}


def norm_cases(dev):
    out = {}
    for label, rows, width in (("SD3", 8192, 1536), ("Flux", 4096, 3072)):
        x = torch.randn(rows, width, device=dev, dtype=torch.bfloat16)
        shift, scale = (0.1 * torch.randn(width, device=dev, dtype=torch.bfloat16) for _ in range(2))
        out[f"{label} layer norm + modulation ({rows} x {width}) -> qkv"] = (
            lambda x, shift, scale: F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift, (x, shift, scale), None)
    return out


def concat_cases(dev):
    attn = torch.randn(4352, 3072, device=dev, dtype=torch.bfloat16)
    mlp = torch.randn(4352, 12288, device=dev, dtype=torch.bfloat16)
    return {"Flux cat(attention, GELU(mlp)) (4352 x 15360) -> linear2":
            (lambda a, m: torch.cat([a, F.gelu(m, approximate="tanh")], dim=-1), (attn, mlp),
             lambda a, m: gelu_quantize_rows(torch.cat([a, m], dim=-1), a.shape[-1]))}


def _fused(producer):
    return lambda *t: quantize(producer(*t), "row")


def _split(producer):
    def fn(*t):
        y = producer(*t)
        torch._dynamo.graph_break()  # the producer's output is written in bf16, then quantized by a kernel of its own
        return quantize(y, "row")
    return fn


# The producer alone; with the quantization in the same graph (what a compiled FP8 model got before
# quant/kernels.py); in a graph of its own; through diffboost's one-pass GELU-and-quantize op.
WAYS = {"alone": lambda producer: producer, "fused": _fused, "split": _split}


def run_case(label, producer, inputs, op, configs, args) -> list[dict]:
    rows = []
    moved_in = sum(t.numel() * t.element_size() for t in inputs)
    with torch.inference_mode():
        reference = producer(*inputs)
        ref_q, ref_scale = quantize(reference, "row")
        for config in configs:
            for how in ("alone", "fused", "split", "op"):
                if how == "op" and op is None:
                    continue
                torch._dynamo.reset()
                fn = op if how == "op" else WAYS[how](producer)
                compiled = torch.compile(fn, dynamic=False, options=CONFIGS[config])
                row = {"case": label, "config": config, "quantization": how, "us": float("nan"), "tb_per_s": 0.0}
                try:
                    out = compiled(*inputs)
                    ms = graph_time_ms(lambda c=compiled: c(*inputs), args.warmup, args.iters, args.repeats)
                except Exception as e:  # noqa: BLE001 - a setting inductor fails on is a result, not the end of the study
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                moved_out = reference.numel() * (2 if how == "alone" else 1)
                row.update(us=ms * 1e3, tb_per_s=(moved_in + moved_out) / ms / 1e9)
                if how != "alone":  # same FP8 codes as the eager quantization, up to rounding at a code boundary
                    q, scale = out
                    row["scale_max_rel_diff"] = float(((scale - ref_scale).abs() / ref_scale).max())
                    row["codes_differing"] = float((q.float() != ref_q.float()).float().mean())
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    configs = args.configs.split(",")
    rows = []
    for cases in (gelu_cases(dev), norm_cases(dev), concat_cases(dev)):
        for label, (producer, inputs, op) in cases.items():
            rows += run_case(label, producer, inputs, op, configs, args)
    print("\n| case | inductor setting | producer alone (us) | with row-wise FP8 quantization in its graph (us) | "
          "quantization in a kernel of its own (us) | diffboost's GELU-and-quantize op (us) | codes unlike eager's |")
    print("|---|---|---|---|---|---|---|")
    table: dict[tuple, dict] = {}
    for r in rows:
        table.setdefault((r["case"], r["config"]), {})[r["quantization"]] = r
    for (case, config), ways in table.items():
        cell = {how: f"{ways[how]['us']:.1f}" if how in ways else "-" for how in ("alone", "fused", "split", "op")}
        differ = ways.get("op", ways["fused"]).get("codes_differing", float("nan"))
        print(f"| {case} | {config} | {cell['alone']} | {cell['fused']} | {cell['split']} | {cell['op']} | "
              f"{differ:.2%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
