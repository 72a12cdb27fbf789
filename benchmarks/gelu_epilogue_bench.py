"""The DiTs' MLPs (linear, tanh-GELU, linear) compiled by inductor, with and without `gelu-epilogue`
(the GELU computed inside cuBLAS's first matrix multiply), on each model's shapes at 1024x1024:
time, and error against a float32 reference.

  python benchmarks/gelu_epilogue_bench.py [--json PATH]

Rows: the first linear layer alone (no GELU: the floor), linear + GELU, and the whole MLP, each as
inductor compiles it and with the pass applied to the captured graph first."""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from attention_bench import time_ms
from torch._inductor.compile_fx import compile_fx

from diffboost.backends.gelu_epilogue import use_gelu_epilogue
from diffboost.measure.compare import relative_error

# tokens (CFG batch included), width, hidden width of the MLP
SHAPES = {
    "SD3-medium image MLP (2 x 4096 tokens)": (8192, 1536, 6144),
    "PixArt-alpha MLP (2 x 4096 tokens)": (8192, 1152, 4608),
    "Flux-dev double-block image MLP (4096 tokens)": (4096, 3072, 12288),
}


def gelu_only(x, w1, b1, w2, b2):
    return F.gelu(F.linear(x, w1, b1), approximate="tanh")


def mlp(x, w1, b1, w2, b2):
    return F.linear(gelu_only(x, w1, b1, w2, b2), w2, b2)


def linear_only(x, w1, b1, w2, b2):
    return F.linear(x, w1, b1)


def compiled(fn, epilogue: bool):
    rewritten = []

    def backend(gm, example_inputs):
        rewritten.append(use_gelu_epilogue(gm) if epilogue else 0)
        return compile_fx(gm, example_inputs)

    return torch.compile(fn, backend=backend, fullgraph=True), rewritten


def shape_rows(where: str, m: int, k: int, n: int, g: torch.Generator) -> list[dict]:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    args = (rand(2, m // 2, k), rand(n, k, scale=k ** -0.5), rand(n, scale=0.1), rand(k, n, scale=n ** -0.5),
            rand(k, scale=0.1))
    rows = []
    for name, fn in (("linear alone", linear_only), ("linear + GELU", gelu_only), ("MLP", mlp)):
        ref = fn(*(a.float() for a in args))
        for epilogue in (False, True) if fn is not linear_only else (False,):
            run, rewritten = compiled(fn, epilogue)
            out = run(*args)
            ms = time_ms(lambda run=run: run(*args))
            flop = 2 * m * k * n * (2 if fn is mlp else 1)
            row = {"shape": where, "what": name, "gelu_epilogue": epilogue, "rewritten": rewritten,
                   "ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1),
                   "rel_err": float(f"{relative_error(out, ref):.3e}")}
            rows.append(row)
            print(f"{where:48s} {name:14s} epilogue={epilogue!s:5s} {ms:7.3f} ms {row['tflops']:6.1f} TFLOP/s "
                  f"err {row['rel_err']:.2e} rewritten {rewritten}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = [row for where, shape in SHAPES.items() for row in shape_rows(where, *shape, g)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
