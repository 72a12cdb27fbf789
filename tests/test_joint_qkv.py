"""joint-qkv's graph pass on real torch.compile traces: SD3's prompt and image q/k/v projections write
one shared buffer instead of being concatenated, in ComfyUI's own MMDiT and in hand-written cases that
must stay as they are. On the CPU the op writes the same rows as on the GPU (the same calls)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import graph_passes
from helpers.comfy_modules import comfy_flux, comfy_sd3

from diffboost.backends import joint_qkv as jq
from diffboost.measure.compare import relative_error
from diffboost.quant.fp8 import quantize


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()


def compiled_counting(fn):
    return graph_passes.compiled_counting(fn, lambda gm: jq.use_joint_qkv(gm, devices=("cpu",)))


def pytorch_attention(func, *args, **kwargs):
    """ComfyUI's own SDPA attention (the CPU's default attention asks for free memory, a graph break)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def sd3_inputs(net_kwargs, prompt_tokens=None):
    kwargs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in net_kwargs.items()}
    if prompt_tokens is not None:
        kwargs["context"] = kwargs["context"][:, :prompt_tokens].clone()
    torch._dynamo.mark_dynamic(kwargs["context"], 1)  # as Compile Model keeps the prompt's length
    kwargs["transformer_options"] = {"optimized_attention_override": pytorch_attention}
    return kwargs


def test_comfyui_s_sd3_writes_its_q_k_v_in_place_for_any_prompt_length(comfy_host):
    net, net_kwargs = comfy_sd3()
    net = net.to(torch.bfloat16)
    originals = {n: type(m) for n, m in net.named_modules()}
    fn, counts = compiled_counting(net)
    with torch.no_grad():
        for prompt_tokens in (None, 5):
            kwargs = sd3_inputs(net_kwargs, prompt_tokens)
            assert relative_error(fn(**kwargs), net(**kwargs)) == 0  # the same matmuls, rows in place
    assert counts == [6]  # q, k and v of both blocks, one graph for both prompt lengths
    assert {n: type(m) for n, m in net.named_modules()} == originals


def fp8_standin(net, prompt_fp8=False):
    """Quantize FP8's stand-in for `net` with the image's q/k/v layers in FP8 (and the prompt's, else kept
    as by default), multiplying through torch._scaled_mm, which runs on the CPU as well."""
    from diffboost.quant import QuantConfig, fp8_layers, quantized_standin

    fp8 = ("*.x_block.attn.qkv", "*.context_block.attn.qkv") if prompt_fp8 else ("*.x_block.attn.qkv",)
    config = QuantConfig(min_features=16, min_weights=0, ignore=("*",), submodules=tuple((p, "rowwise") for p in fp8),
                         allow_reference_path=True, fuse_gelu=False)
    standin = quantized_standin(net, config)
    for layer in fp8_layers(standin):
        layer.refresh("cpu")  # quantized now, so the call's refresh keeps the kernel set here
        layer.kernel = "scaled_mm"  # FP8 tensor cores' path; the CPU only has it allowed as the reference path
    return standin, fp8_layers(standin)


@pytest.mark.parametrize("prompt_fp8", [False, True])
def test_comfyui_s_sd3_with_fp8_q_k_v_writes_them_in_place_for_any_prompt_length(comfy_host, prompt_fp8):
    net, net_kwargs = comfy_sd3()
    standin, layers = fp8_standin(net.to(torch.bfloat16), prompt_fp8)
    assert len(layers) == (4 if prompt_fp8 else 2)  # the image's q/k/v layer of each block, and the prompt's
    fn, counts = compiled_counting(standin)
    with torch.no_grad():
        for prompt_tokens in (None, 5):
            kwargs = sd3_inputs(net_kwargs, prompt_tokens)
            assert relative_error(fn(**kwargs), standin(**kwargs)) == 0  # the same FP8 matmuls, a sample at a time
    assert counts == [6]  # one graph for both prompt lengths


def test_comfyui_s_flux_is_left_as_it_is(comfy_host):
    """Flux concatenates its q and k after their norms and RoPE: the presets' joint-qkv touches nothing there."""
    net, net_kwargs = comfy_flux()
    net = net.to(torch.bfloat16)
    kwargs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in net_kwargs.items()}
    kwargs["transformer_options"] = {"optimized_attention_override": pytorch_attention}
    fn, counts = compiled_counting(net)
    with torch.no_grad():
        assert relative_error(fn(**kwargs), net(**kwargs)) == 0
    assert counts == [0]  # one graph, nothing rewritten


def joint(ctx, x, wc, bc, wx, bx, uses=()):
    """SD3's joint q/k/v, as ComfyUI writes it (split_qkv, then a concatenation along the tokens);
    `uses`: what else is done with the outputs."""
    def split(qkv):
        q, k, v = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, -1, 4).movedim(2, 0)
        return q.reshape(q.shape[0], q.shape[1], -1), k.reshape(k.shape[0], k.shape[1], -1), v

    c, i = F.linear(ctx, wc, bc), F.linear(x, wx, bx)
    cq, ck, cv = split(F.rms_norm(c, (c.shape[-1],)) if "norm" in uses else c)
    iq, ik, iv = split(i)
    q, k, v = (torch.cat(p, dim=1) for p in ((cq, iq), (ck, ik), (cv, iv)))
    q, k = q.view(2, -1, 2, 4).transpose(1, 2), k.view(2, -1, 2, 4).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
    return out + i.mean() if "image output" in uses else out


def joint_weights(bias=True):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 8), (2, 6, 8), (24, 8), (24,), (24, 8), (24,)]
    out = [torch.randn(*s, generator=g).to(torch.bfloat16) for s in shapes]
    return out if bias else [None if t.ndim == 1 else t for t in out]


@pytest.mark.parametrize("why, uses, bias, rewritten", [
    ("ComfyUI's pattern", (), True, 3),
    ("layers without a bias", (), False, 3),
    ("a norm on one side before the concatenation (SD3.5's q/k norms): not a view", ("norm",), True, 0),
    ("a layer's output also used elsewhere: it would be computed twice", ("image output",), True, 0),
])
def test_which_concatenations_go(why, uses, bias, rewritten):
    args = joint_weights(bias)
    fn, counts = compiled_counting(lambda *a: joint(*a, uses=uses))
    assert relative_error(fn(*args), joint(*args, uses=uses)) < 1e-6, why
    assert counts == [rewritten], why


def test_a_concatenation_of_other_columns_along_the_features_or_of_flattened_rows_stays():
    ctx, x, wc, bc, wx, bx = joint_weights()

    def mismatched(ctx, x):  # the prompt's q beside the image's k
        c, i = F.linear(ctx, wc, bc), F.linear(x, wx, bx)
        return torch.cat((c[..., :8], i[..., 8:16]), dim=1)

    def along_features(ctx, x):
        c, i = F.linear(ctx, wc, bc), F.linear(ctx, wx, bx)
        return torch.cat((c[..., :8], i[..., :8]), dim=2)

    def flattened_rows(ctx, x):  # linear layers on rows flattened to (batch * tokens): only FP8 ones come so
        c = F.linear(ctx.reshape(-1, 8), wc, bc).reshape(2, 3, 24)
        i = F.linear(x.reshape(-1, 8), wx, bx).reshape(2, 6, 24)
        return torch.cat((c[..., :8], i[..., :8]), dim=1)

    for fn in (mismatched, along_features, flattened_rows):
        compiled, counts = compiled_counting(fn)
        assert relative_error(compiled(ctx, x), fn(ctx, x)) < 1e-6
        assert counts == [0], fn.__name__


def linear_parts(x, weight, bias):
    return [x, weight, bias, None, None]


def fp8_parts(x, weight, bias, granularity):
    """joint_linear's FP8 layer: torch._scaled_mm's operands for `x @ weight.T + bias`, as Fp8Linear passes them."""
    xq, x_scale = quantize(x.reshape(-1, x.shape[-1]), granularity)
    wq, w_scale = quantize(weight, granularity)
    return [xq, wq.t(), bias, x_scale, w_scale.reshape(1, -1) if granularity == "row" else w_scale]


def fp8_expected(x, weight, bias, granularity):
    xq, x_scale, wq_t, w_scale = (fp8_parts(x, weight, bias, granularity)[i] for i in (0, 3, 1, 4))
    out = (xq.float() * x_scale) @ (wq_t.float() * w_scale) + (0 if bias is None else bias.float())
    return out.reshape(*x.shape[:-1], -1)


def test_the_op_writes_each_layer_s_rows_where_the_concatenation_has_them():
    ctx, x, wc, bc, wx, bx = (t.float() for t in joint_weights())
    expected = torch.cat((F.linear(ctx, wc, bc), F.linear(x, wx, bx)), dim=1)
    parts = lambda bias_c, bias_x: (linear_parts(ctx, wc, bias_c), linear_parts(x, wx, bias_x))  # noqa: E731
    assert relative_error(jq.joint_linear(2, *parts(bc, bx), torch.float32, False), expected) < 1e-6
    assert relative_error(jq.joint_linear(2, *parts(None, None), torch.float32, False), expected - torch.cat(
        (bc.expand(2, 3, 24), bx.expand(2, 6, 24)), dim=1)) < 1e-6


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_the_op_writes_fp8_layers_rows_beside_linear_ones(granularity):
    """Quantize FP8 keeps the prompt's q/k/v in bf16 and makes the image's FP8: both kinds in one buffer."""
    ctx, x, wc, bc, wx, bx = joint_weights()
    for prompt_fp8 in (False, True):
        prompt = fp8_parts(ctx, wc, bc, granularity) if prompt_fp8 else linear_parts(ctx, wc, bc)
        out = jq.joint_linear(2, prompt, fp8_parts(x, wx, bx, granularity), torch.bfloat16, True)
        expected_prompt = fp8_expected(ctx, wc, bc, granularity) if prompt_fp8 else F.linear(ctx, wc, bc)
        expected = torch.cat((expected_prompt.float(), fp8_expected(x, wx, bx, granularity)), dim=1)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 24)
        assert relative_error(out, expected) < 1e-2  # bf16 output rounding only


@pytest.mark.parametrize("fp8", [False, True])
def test_compile_model_applies_the_pass_inside_inductor(monkeypatch, caplog, comfy_host, fp8):
    from helpers.compile_caches import without_compile_caches

    from diffboost.backends import CompileOptions, compile_module

    monkeypatch.setattr(jq, "DEVICES", ("cuda", "cpu"))
    net, net_kwargs = comfy_sd3()
    net = net.to(torch.bfloat16)
    model = fp8_standin(net)[0] if fp8 else net
    kwargs = sd3_inputs(net_kwargs)
    with torch.no_grad(), without_compile_caches(), caplog.at_level("INFO", logger="diffboost"):
        expected = model(**kwargs)
        out = compile_module(model, CompileOptions.from_user("inductor", "O3:joint-qkv"))(**kwargs)
    assert "joint-qkv writes 6 concatenated" in caplog.text
    assert relative_error(out, expected) < 2e-2  # inductor keeps fp32 between fused operations
