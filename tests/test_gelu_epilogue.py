"""gelu-epilogue's graph pass on real torch.compile traces of ComfyUI's own DiT modules: which
linear + tanh-GELU pairs become one matrix multiply with the GELU inside, and that the rewritten graph
computes what the model does. On the CPU `linear_gelu` is the plain computation; the GPU's cuBLAS
epilogue is timed and checked in benchmarks/gelu_epilogue_bench.py (RESULTS.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import graph_passes
from helpers.comfy_modules import comfy_flux, comfy_sd3

from diffboost.backends import gelu_epilogue as ge
from diffboost.measure.compare import relative_error


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()


def compiled_counting(fn):
    """`fn` compiled with the pass applied to each graph (CPU tensors allowed), and the list of how
    many pairs it rewrote in each graph."""
    return graph_passes.compiled_counting(fn, lambda gm: ge.use_gelu_epilogue(gm, devices=("cpu",)))


def pytorch_attention(func, *args, **kwargs):
    """ComfyUI's own attention override: its SDPA attention, which traces into one graph on the CPU too
    (the CPU's default attention asks for free memory, a graph break)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


@pytest.mark.parametrize("arch, pairs, tolerance", [
    # the image MLP of both joint blocks, the prompt MLP of the first (the last block has none): the same
    # arithmetic on the CPU
    ("sd3", 3, 0.0),
    # the double block's image and prompt MLPs, and the single block's GELU after its split, whose last
    # layer becomes a sum of two (bf16 rounds the parts before the sum)
    ("flux", 3, 1e-2),
])
def test_the_mlps_of_comfyui_s_dits_get_their_gelu_inside_the_matmul(comfy_host, arch, pairs, tolerance):
    net, kwargs = comfy_sd3() if arch == "sd3" else comfy_flux()
    net = net.to(torch.bfloat16)
    kwargs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kwargs.items()}
    kwargs["transformer_options"] = {"optimized_attention_override": pytorch_attention}
    originals = {n: type(m) for n, m in net.named_modules()}
    fn, counts = compiled_counting(net)
    with torch.no_grad():
        expected, out = net(**kwargs), fn(**kwargs)
    assert counts == [pairs]  # one graph
    assert relative_error(out, expected) <= tolerance
    assert {n: type(m) for n, m in net.named_modules()} == originals  # the model itself is untouched


def mlp(x, w1, b1, w2, b2, approximate="tanh"):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def weights(dtype=torch.bfloat16, bias=True):
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(2, 5, 16, generator=g), torch.randn(64, 16, generator=g), torch.randn(16, 64, generator=g)
    b1, b2 = (torch.randn(64, generator=g), torch.randn(16, generator=g)) if bias else (None, None)
    return [t if t is None else t.to(dtype) for t in (x, w1, b1, w2, b2)]


def test_a_biased_half_precision_linear_then_tanh_gelu_is_rewritten_and_matches():
    fn, counts = compiled_counting(mlp)
    args = weights()
    assert relative_error(fn(*args), mlp(*args)) < 1e-6
    assert counts == [1]


def used_twice(x, w1, b1, w2, b2):
    h = F.linear(x, w1, b1)
    return F.gelu(h, approximate="tanh") + h


@pytest.mark.parametrize("why, fn, args", [
    ("exact GELU", lambda *a: mlp(*a, approximate="none"), weights()),
    ("float32", mlp, weights(torch.float32)),
    ("no bias", mlp, weights(bias=False)),
    ("the linear's output also used elsewhere", used_twice, weights()),
])
def test_other_pairs_stay_as_they_are(why, fn, args):
    compiled, counts = compiled_counting(fn)
    assert relative_error(compiled(*args), fn(*args)) < 1e-6
    assert counts == [0], why


def single_block(x, w1, b1, w2, b2, order=1, reuse=False):
    """Flux's single-stream block's computation: one layer for q, k, v and the MLP, attention, then one
    layer over the attention's output and the MLP's GELU concatenated (`order` -1: the other way round;
    `reuse`: the GELU's input also used elsewhere)."""
    qkv, mlp = torch.split(F.linear(x, w1, b1), [48, 64], dim=-1)
    q, k, v = qkv.view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16)
    parts = (attention, F.gelu(mlp, approximate="tanh"))[::order]
    out = x + F.linear(torch.cat(parts, 2), w2, b2)
    return out + mlp[..., :16] if reuse else out


def single_block_weights():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 16), (112, 16), (112,), (16, 80), (16,)]
    return [torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in shapes]


@pytest.mark.parametrize("case, rewritten", [({}, 1), ({"order": -1}, 0), ({"reuse": True}, 0)])
def test_a_single_stream_block_splits_its_layers_around_the_gelu(case, rewritten):
    args = single_block_weights()
    fn, counts = compiled_counting(lambda *a: single_block(*a, **case))
    assert relative_error(fn(*args), single_block(*args, **case)) < 1e-2
    assert counts == [rewritten]


def test_the_sum_over_the_parts_is_the_layer_over_their_concatenation():
    first, second, weight, bias = torch.randn(3, 7, 16), torch.randn(3, 7, 64), torch.randn(24, 80), torch.randn(24)
    expected = F.linear(torch.cat((first, second), -1), weight, bias)
    assert relative_error(ge.linear_of_pair(first, second, weight, bias), expected) < 1e-6


def test_the_gpu_s_single_call_takes_its_operands_in_the_right_order():
    """`matmul_with_gelu` is the call the GPU runs. On the CPU the same aten op applies the exact GELU, so
    compare it with that: the bias, the weight's transpose and the token dimensions are all checked."""
    x, w1, b1, _, _ = weights(torch.float32)
    expected = F.gelu(F.linear(x, w1, b1))
    out = ge.matmul_with_gelu(x, w1, b1)
    assert out.shape == (2, 5, 64)
    assert relative_error(out, expected) < 1e-6


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.act = torch.nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_compile_model_s_presets_apply_the_pass_inside_inductor(monkeypatch, caplog):
    """O3 through the engine's inductor backend, with the pass allowed on the CPU: the log says what it
    rewrote, and inductor's compiled result equals the module's."""
    from helpers.compile_caches import without_compile_caches

    from diffboost.backends import CompileOptions, compile_module

    monkeypatch.setattr(ge, "DEVICES", ("cuda", "cpu"))
    model, x = Mlp().to(torch.bfloat16).eval(), weights()[0]
    with torch.no_grad(), without_compile_caches(), caplog.at_level("INFO", logger="diffboost"):
        out = compile_module(model, CompileOptions.from_user("inductor", "O3"))(x)
        expected = model(x)
    assert "gelu-epilogue computes 1 tanh-GELUs" in caplog.text
    assert relative_error(out, expected) < 1e-2  # inductor keeps fp32 between the fused operations, eager rounds
