"""How far one call of the random-weight PixArt moves when a single input value moves by one bf16 step,
beside how far a compiled call is from eager: the floor under "error against eager" for this model.

  python benchmarks/pixart_sensitivity.py [--res 512] [--device cpu] [--json F]

Builds the bench's random-weight PixArt-alpha (ComfyUI's own module, bf16) and calls its denoiser once
on seeded inputs (batch 2, as with CFG): eager; eager with one latent value raised by one bf16 step
(three places); compiled whole with inductor, with and without `match-eager`'s rounding; and the
same model in float32. Prints each output's relative difference from eager's, and from float32's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PLACES = (0, 1000, 5000)  # which latent values are moved, one at a time


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def one_step_up(x: torch.Tensor, index: int) -> torch.Tensor:
    """`x` with its value at `index` (flattened) raised by one bf16 step (2^-7 of its magnitude)."""
    moved = x.clone()
    flat = moved.view(-1)
    flat[index] = (flat[index].float() * (1 + 2 ** -7)).to(x.dtype)
    assert flat[index] != x.view(-1)[index]
    return moved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from diffboost.bench import host, models

    host.boot(cpu=args.device == "cpu", load_pack=False)
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA, the attention ComfyUI uses on a GPU
    device = torch.device(args.device)
    net = models.build("pixart", device, torch.bfloat16).patcher.model.diffusion_model.eval()
    g = torch.Generator().manual_seed(0)
    side = args.res // 8
    x = torch.randn(2, 4, side, side, generator=g).to(device, torch.bfloat16)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 120, 4096, generator=g).to(device, torch.bfloat16)

    def call(model, latent, cond) -> torch.Tensor:
        with torch.no_grad():
            return model(latent, t, cond).float()

    eager = call(net, x, context)
    rows = {"eager, called again": relative(call(net, x, context), eager)}
    for i in PLACES:
        rows[f"eager, latent value {i} one bf16 step up"] = relative(call(net, one_step_up(x, i), context), eager)
    compiled = {}
    for name, emulate in (("compiled whole", False), ("compiled whole, match-eager", True)):
        torch._dynamo.reset()
        with torch._inductor.config.patch(emulate_precision_casts=emulate):
            compiled[name] = call(torch.compile(net), x, context)
        rows[name] = relative(compiled[name], eager)
    exact = call(net.float(), x.float(), context.float())
    against_fp32 = {"eager": relative(eager, exact), **{k: relative(v, exact) for k, v in compiled.items()}}

    print(f"\nPixArt-alpha, random weights, bf16, {args.res}x{args.res}, one call, {args.device}")
    print("\n| call | rel. difference from eager | from float32 |\n|---|---|---|")
    for name, diff in rows.items():
        exact_diff = f"{against_fp32[name]:.2e}" if name in against_fp32 else "-"
        print(f"| {name} | {diff:.2e} | {exact_diff} |")
    print(f"| eager | 0 | {against_fp32['eager']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"res": args.res, "device": args.device, "from_eager": rows,
                                               "from_float32": against_fp32}, indent=1))


if __name__ == "__main__":
    main()
