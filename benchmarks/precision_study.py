"""How far one denoiser call of each variant is from a float32 reference of the same random-weight
model: separates what compilation changes from what bfloat16 itself changes.

  python benchmarks/precision_study.py [--model flux] [--json PATH]

The float32 model and the bfloat16 one hold the same weights; every variant gets the same seeded
inputs. "eager bf16" against float32 is the floor that no bfloat16 variant can beat: a compiled
or quantized variant is faithful when its error against float32 is close to that floor."""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffboost.measure.compare import cosine_similarity, relative_error


def inputs(name: str, dtype: torch.dtype, res: int = 1024, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    if name == "flux":
        return {"x": randn(1, 16, res // 8, res // 8), "timestep": torch.tensor([0.5], device="cuda", dtype=dtype),
                "context": randn(1, 256, 4096), "y": randn(1, 768),
                "guidance": torch.tensor([3.5], device="cuda", dtype=dtype), "transformer_options": {}}
    if name == "sd3":
        return {"x": randn(2, 16, res // 8, res // 8),
                "timesteps": torch.tensor([500.0] * 2, device="cuda", dtype=dtype),
                "context": randn(2, 154, 4096), "y": randn(2, 2048), "transformer_options": {}}
    raise ValueError(f"model {name}: flux or sd3")


def timed(fn, reps: int = 3) -> tuple[torch.Tensor, float]:
    out = fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / reps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux", choices=["flux", "sd3"])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from diffboost.bench import host, models

    host.boot(cpu=False, load_pack=False)
    device = torch.device("cuda")
    ref_model = models.build(args.model, device, dtype=torch.float32, seed=0).patcher.model.diffusion_model
    with torch.no_grad():
        ref = ref_model(**inputs(args.model, torch.float32)).float()
    ref_model.to("cpu")  # Flux in float32 and in bfloat16 would not both fit on one 80 GB GPU
    torch.cuda.empty_cache()
    bf16_model = models.build(args.model, device, dtype=torch.bfloat16, seed=1).patcher.model.diffusion_model
    bf16_model.load_state_dict(ref_model.state_dict())  # the same weights, rounded to bfloat16
    del ref_model
    with torch.no_grad():
        x = inputs(args.model, torch.bfloat16)
        rows = []

        def record(label, fn):
            out, ms = timed(fn)
            row = {"variant": label, "ms": round(ms, 2), "rel_err_vs_fp32": relative_error(out, ref),
                   "cosine_vs_fp32": cosine_similarity(out, ref), "finite": bool(torch.isfinite(out).all())}
            if rows:
                row["rel_err_vs_eager_bf16"] = relative_error(out, rows[0]["out"])
            if len(rows) >= 3:  # rows[2] is the compiled bfloat16 one
                row["rel_err_vs_compiled_bf16"] = relative_error(out, rows[2]["out"])
                row["cosine_vs_compiled_bf16"] = cosine_similarity(out, rows[2]["out"])
                print(f"{'':34} vs compiled bf16: rel err {row['rel_err_vs_compiled_bf16']:.3e} cos "
                      f"{row['cosine_vs_compiled_bf16']:.6f}")
            row["out"] = out.float()
            rows.append(row)
            print(f"{label:34} {ms:9.2f} ms  vs fp32: rel err {row['rel_err_vs_fp32']:.3e} cos "
                  f"{row['cosine_vs_fp32']:.6f}  vs eager bf16: {row.get('rel_err_vs_eager_bf16', 0):.3e}", flush=True)

        record("eager bf16", lambda: bf16_model(**x))
        record("eager bf16 again", lambda: bf16_model(**x))
        compiled = torch.compile(bf16_model)
        record("torch.compile default", lambda: compiled(**x))
        torch._dynamo.reset()
        from diffboost.quant import DEFAULT_IGNORE, Fp8Quantizer, QuantConfig

        fp8 = torch.compile(Fp8Quantizer(QuantConfig.from_user("rowwise", ignore=DEFAULT_IGNORE))(bf16_model))
        record("FP8 rowwise (default layers), compiled", lambda: fp8(**x))
    print(f"output norm {float(ref.norm()):.4g}; input norm {float(x['x'].float().norm()):.4g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "out"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
