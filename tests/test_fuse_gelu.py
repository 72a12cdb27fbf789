"""FP8 layers that take over the tanh-GELU in front of them: which ones, on ComfyUI's own SD3 and
Flux modules, that the stand-in computes what the unfused one does, and the Triton kernel's arithmetic
(run by Triton's interpreter on the CPU; the GPU run is in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.comfy_modules import comfy_flux, comfy_sd3

from diffboost.quant import DEFAULT_IGNORE, Fp8Linear, QuantConfig, quantized_standin
from diffboost.quant.kernels import gelu_quantize_rows, reference

ROOT = Path(__file__).resolve().parents[1]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def standin(net, fuse_gelu: bool, quant_type: str = "rowwise"):
    config = QuantConfig.from_user(quant_type, ignore=DEFAULT_IGNORE, min_features=16, min_weights_millions=0,
                                   allow_reference_path=True, fuse_gelu=fuse_gelu)
    return quantized_standin(net, config)


def fused_layers(net) -> dict[str, int]:
    return {n: m.gelu_from for n, m in net.named_modules() if isinstance(m, Fp8Linear) and m.gelu_from is not None}


@pytest.mark.parametrize("arch, expected", [
    ("flux", {"double_blocks.0.img_mlp.2": 0, "single_blocks.0.linear2": 256}),
    ("sd3", {"joint_blocks.0.x_block.mlp.fc2": 0, "joint_blocks.1.x_block.mlp.fc2": 0}),
])
def test_fp8_layers_take_over_the_tanh_gelu_in_front_of_them(comfy_host, arch, expected):
    net, kwargs = comfy_flux() if arch == "flux" else comfy_sd3()
    originals = {n: type(m) for n, m in net.named_modules()}
    with torch.no_grad():
        full = net(**kwargs, transformer_options={})
        fused, unfused = standin(net, True), standin(net, False)
        out_fused, out_unfused = fused(**kwargs, transformer_options={}), unfused(**kwargs, transformer_options={})

    assert fused_layers(fused) == expected and fused_layers(unfused) == {}
    for layer in expected:  # the GELU in front of each is an Identity in the stand-in, still a GELU in the model
        act = {"img_mlp.2": "img_mlp.1", "linear2": "mlp_act", "fc2": "act"}[next(
            k for k in ("img_mlp.2", "linear2", "fc2") if layer.endswith(k))]
        act_name = layer.rsplit(".", 2 if act == "img_mlp.1" else 1)[0] + "." + act
        assert isinstance(fused.get_submodule(act_name), torch.nn.Identity)
        assert isinstance(net.get_submodule(act_name), torch.nn.GELU)
    assert {n: type(m) for n, m in net.named_modules()} == originals
    # Same quantized arithmetic with and without the fusion (the GELU computed in float32 either way here),
    # and both as close to the full-precision model as FP8 allows.
    assert rel_error(out_fused, out_unfused) < 1e-5
    assert 1e-4 < rel_error(out_fused, full) < 0.1


def test_quantize_fp8_on_sd3_says_which_layers_took_over_their_gelu_and_samples(comfy_host, tiny_models):
    from helpers import tiny_models as T

    def quantize(fuse_gelu):
        inputs = {"min_features": 16, "min_weights_millions": 0.0, "allow_reference_path": True}
        if not fuse_gelu:  # the node's default ignore list, plus the two MLPs' second layer
            from diffboost.quant import DEFAULT_IGNORE
            inputs["ignore"] = DEFAULT_IGNORE + ", *.x_block.mlp.fc2"
        return lambda link: comfy_host.node("DiffBoostQuantizeFP8", model=link, **inputs)

    texts, latents = {}, {}
    for fuse in (True, False):
        prompt = T.graph("sd3", tiny_models, insert=quantize(fuse), decode=False)
        result = comfy_host.run_prompt(prompt, fresh=True).check()
        texts[fuse], latents[fuse] = result.outputs["10"]["text"][0], comfy_host.captured_latent().clone()
    assert "2 of them compute the tanh-GELU in front of them" in texts[True]
    assert "tanh-GELU" not in texts[False]  # with the layers after the GELUs kept, nothing is handed over
    assert torch.isfinite(latents[True]).all() and not torch.equal(latents[True], latents[False])


def test_the_fused_op_compiles_into_the_graph_without_a_break(comfy_host):
    from torch._dynamo.testing import CompileCounterWithBackend

    net, kwargs = comfy_flux()
    counts = {}
    with torch.no_grad():
        for fuse in (False, True):
            torch._dynamo.reset()
            q = standin(net, fuse)
            counter = CompileCounterWithBackend("aot_eager")  # the op's fake implementation is what tracing needs
            out = torch.compile(q, backend=counter)(**kwargs, transformer_options={})
            assert rel_error(out, q(**kwargs, transformer_options={})) < 1e-5
            counts[fuse] = counter.frame_count
    assert counts[True] == counts[False], counts  # the op adds no graph break


@pytest.mark.parametrize("quant_type", ["tensorwise", "weight_only"])
def test_the_other_quant_types_apply_the_gelu_they_took_over_before_quantizing(comfy_host, quant_type):
    net, kwargs = comfy_sd3()
    with torch.no_grad():
        fused, unfused = standin(net, True, quant_type), standin(net, False, quant_type)
        assert fused_layers(fused) and not fused_layers(unfused)
        out_fused, out_unfused = fused(**kwargs, transformer_options={}), unfused(**kwargs, transformer_options={})
    assert rel_error(out_fused, out_unfused) < 1e-5


def test_only_the_tanh_gelu_right_before_the_layer_is_taken_over():
    from diffboost.quant.fuse_gelu import gelu_handovers

    seq = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(64, 32),
                              torch.nn.GELU(), torch.nn.Linear(32, 32))
    assert gelu_handovers(seq, {"2": "rowwise", "4": "rowwise"}) == {"2": ("1", 0)}  # "3" is the exact GELU
    assert gelu_handovers(seq, {"4": "rowwise"}) == {}  # the layer after the tanh-GELU is not FP8


@pytest.mark.parametrize("rows, cols, gelu_from", [(5, 96, 0), (7, 80, 32), (3, 33, 16), (1, 6144, 0)])
def test_the_op_off_the_gpu_is_the_reference_and_matches_a_plain_gelu_then_quantize(rows, cols, gelu_from):
    from diffboost.quant.fp8 import quantize

    x = (3 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))).to(torch.bfloat16)
    q, scale = gelu_quantize_rows(x, gelu_from)
    plain = torch.cat([x[:, :gelu_from].float(), torch.nn.functional.gelu(x[:, gelu_from:].float(),
                                                                           approximate="tanh")], dim=1)
    expected_q, expected_scale = quantize(plain, "row")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    assert torch.equal(scale, expected_scale) and torch.equal(q.float(), expected_q.float())
    assert rel_error(q.float() * scale, plain) < 0.05


KERNEL_CHECK = r"""
import json, sys, torch, triton
from diffboost.quant.kernels import _kernel, reference
from diffboost.quant.fp8 import gelu_tail
sys.path.insert(0, sys.argv[3])
from gelu_quantize_study import looped_kernel
kernel, out = (_kernel() if sys.argv[1] == "whole row" else looped_kernel()), []
for rows, cols, gelu_from, chunk in json.loads(sys.argv[2]):
    x = (3 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols))).to(torch.bfloat16)
    # float32 codes: what the kernel writes before the cast to e4m3, which the interpreter rounds wrongly
    scaled, scale = torch.empty(rows, cols), torch.empty(rows, 1)
    block = {"BLOCK": triton.next_power_of_2(cols)} if chunk is None else {"CHUNK": chunk}
    kernel[(rows,)](x, scaled, scale, cols, gelu_from, x.stride(0), scaled.stride(0), **block)
    _, expected_scale = reference(x, gelu_from)
    expected = (gelu_tail(x, gelu_from) / expected_scale).clamp(-448, 448)
    out.append([float(((scale - expected_scale).abs() / expected_scale).max()),
                float((scaled - expected).abs().max()), float(scaled.abs().max())])
print(json.dumps(out))
"""


# rows, columns, the GELU from that column, the looped kernel's chunk
@pytest.mark.parametrize("kernel, cases", [
    ("whole row", [(5, 96, 0, None), (7, 80, 32, None), (3, 33, 16, None), (2, 1000, 500, None)]),
    # benchmarks/gelu_quantize_study.py's looped form: rows wider and narrower than a chunk, the GELU from
    # a column inside a chunk
    ("looped", [(3, 100, 0, 32), (4, 80, 40, 32), (2, 20, 5, 32), (2, 96, 33, 16)]),
])
def test_the_triton_kernels_compute_the_reference_arithmetic_in_triton_s_interpreter(kernel, cases):
    pytest.importorskip("triton", reason="!!! TRITON MISSING: the FP8 GELU kernels' test was SKIPPED !!!")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT.parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK, kernel, json.dumps(cases), str(ROOT / "benchmarks")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for (scale_err, code_err, largest), case in zip(json.loads(done.stdout.splitlines()[-1]), cases, strict=True):
        assert scale_err < 1e-6, case
        assert code_err < 1e-3, case  # of codes up to 448: the same GELU, largest magnitude and scaling
        assert largest == pytest.approx(448, rel=1e-6), case  # each row's largest value lands on e4m3's largest


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="!!! NO CUDA GPU: the Triton kernel on the GPU was SKIPPED !!!")
def test_the_triton_kernel_on_the_gpu_matches_the_reference():
    x = (3 * torch.randn(64, 6144, device="cuda")).to(torch.bfloat16)
    for gelu_from in (0, 3072):
        q, scale = gelu_quantize_rows(x, gelu_from)
        expected_q, expected_scale = reference(x, gelu_from)
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
        assert (q.float() != expected_q.float()).float().mean() < 1e-3  # rounding ties of a different GELU formula


SECOND_COPY = r"""
import importlib.util, json, sys, torch
from torch._library.custom_ops import _maybe_get_opdef
from diffboost.quant import kernels as installed
root = sys.argv[1]
# The pack again under another name, as ComfyUI's loader imports custom_nodes/diffboost.
spec = importlib.util.spec_from_file_location("pack_copy", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack_copy"] = pack
spec.loader.exec_module(pack)
import pack_copy.quant.kernels as copied
x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
a, b = installed.gelu_quantize_rows(x, 8), copied.gelu_quantize_rows(x, 8)
print(json.dumps({"first_kept": _maybe_get_opdef("diffboost::gelu_quantize_rows") is installed.gelu_quantize_rows,
                  "same": all(torch.equal(p.float(), q.float()) for p, q in zip(a, b))}))
"""


def test_a_second_copy_of_the_pack_keeps_the_first_definition_of_the_op():
    """ComfyUI imports the pack as its own module copy beside the installed package; defining the op
    again would replace the registration the first copy's callers hold."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", SECOND_COPY, str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"first_kept": True, "same": True}
