"""flash-attn-4's graph pass on real torch.compile traces: which attention calls it hands to
FlashAttention, and that the rewritten graph computes what torch's SDPA does. On the CPU the op runs
its SDPA reference kernel; the CuTe kernels themselves are timed and checked on the GPU
(`benchmarks/attention_bench.py --fa4`, RESULTS.md)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import graph_passes

from diffboost.backends import flash_attention as fa
from diffboost.backends import saved_graph
from diffboost.measure.compare import relative_error


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test's shapes traced afresh, not made dynamic by the test before


def compiled_counting(fn):
    """`fn` compiled whole, with the pass applied to its graph (CPU tensors allowed); the list of
    how many calls the pass replaced in each graph compiled."""
    return graph_passes.compiled_counting(fn, lambda gm: fa.use_flash_attention(gm, devices=("cpu",)),
                                          fullgraph=True)


def joint_attention(image, prompt, heads: int, mask=None):
    """Prompt and image tokens attending jointly (SD3, Flux), in ComfyUI's layout: (batch, tokens,
    heads x dim) viewed as heads and transposed for SDPA, and back."""
    x = torch.cat([prompt, image], dim=1)
    b, n, c = x.shape
    q = x.view(b, n, heads, c // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, q * 0.5, q.flip(-1), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, c)


def inputs(dtype=torch.bfloat16, width=64, prompt_tokens=7):
    g = torch.Generator().manual_seed(0)
    image, prompt = torch.randn(2, 40, width, generator=g), torch.randn(2, prompt_tokens, width, generator=g)
    return image.to(dtype), prompt.to(dtype)


def test_long_attention_runs_through_the_op_and_matches_sdpa(monkeypatch):
    monkeypatch.setattr(fa, "MIN_TOKENS", 32)
    image, prompt = inputs()
    fn, counts = compiled_counting(joint_attention)
    out = fn(image, prompt, 4)
    assert counts == [1]
    assert out.shape == (2, 47, 64)
    assert relative_error(out, joint_attention(image, prompt, 4)) < 1e-3


def test_a_token_count_that_may_change_goes_to_the_op_without_a_new_guard(monkeypatch, caplog):
    image, prompt = inputs()
    torch._dynamo.mark_dynamic(prompt, 1)  # as Compile Model keeps the prompt's length dynamic
    monkeypatch.setattr(fa, "MIN_TOKENS", 32)  # 40 image tokens plus any prompt: always long enough
    fn, counts = compiled_counting(joint_attention)
    fn(image, prompt, 4)
    shorter = inputs(prompt_tokens=9)[1]
    assert relative_error(fn(image, shorter, 4), joint_attention(image, shorter, 4)) < 1e-3
    assert counts == [1]  # one graph for both prompt lengths

    # Long enough for some prompt lengths only (a `regional` block's whole sequence is one symbol):
    # traced long, the call goes to the op, which compares the tokens with MIN_TOKENS at each call.
    def run(fn, tokens):
        prompt = inputs(prompt_tokens=tokens)[1]
        torch._dynamo.mark_dynamic(prompt, 1)
        assert relative_error(fn(image, prompt, 4), joint_attention(image, prompt, 4)) < 1e-3

    monkeypatch.setattr(fa, "MIN_TOKENS", 64)
    for first, then, sent in ((30, 7, [1]), (7, 30, [0])):  # 70 and 47 tokens in all
        torch._dynamo.reset()
        fn, counts = compiled_counting(joint_attention)
        with caplog.at_level(logging.INFO, logger="diffboost"):
            run(fn, first)
        run(fn, then)
        assert counts == sent  # one graph each time; traced short, it stays with torch's kernel
    assert "tokens" in caplog.text
    assert not fa.is_long(47, 47) and fa.is_long(70, 70) and not fa.is_long(70, 47)


@pytest.mark.parametrize("case, why", [
    ("mask", "a mask, dropout, causal attention"),
    ("float32", "dtypes"),
    ("head dim 12", "shapes"),
    ("short", "tokens"),
])
def test_calls_the_kernels_do_not_take_stay_with_torch(monkeypatch, caplog, case, why):
    monkeypatch.setattr(fa, "MIN_TOKENS", 2048 if case == "short" else 32)
    image, prompt = inputs(dtype=torch.float32 if case == "float32" else torch.bfloat16,
                           width=48 if case == "head dim 12" else 64)
    mask = torch.zeros(47, 47, dtype=image.dtype) if case == "mask" else None
    fn, counts = compiled_counting(joint_attention)
    with caplog.at_level(logging.INFO, logger="diffboost"):
        out = fn(image, prompt, 4, mask)
    assert counts == [0] and why in caplog.text
    assert relative_error(out, joint_attention(image, prompt, 4, mask)) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_reason_says_so():
    fa.unavailable_reason.cache_clear()
    assert fa.unavailable_reason() == "flash-attn-4 needs a CUDA GPU"


@pytest.mark.skipif(fa.unavailable_reason() is not None,
                    reason=f"!!! flash-attn-4's kernels were NOT RUN: {fa.unavailable_reason()} !!!")
def test_on_the_gpu_a_short_call_runs_torchs_kernel_and_a_long_one_flashattention():
    def call(tokens):
        g = torch.Generator("cuda").manual_seed(tokens)
        q, k, v = (torch.randn(1, tokens, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        return fa.flash_attention(q, k, v, 0.125), fa.sdpa_reference(q, k, v, 0.125)

    out, ref = call(fa.MIN_TOKENS - 1)
    assert torch.equal(out, ref)  # the op's own fallback: torch's SDPA, bit for bit
    out, ref = call(fa.MIN_TOKENS)
    assert relative_error(out, ref) < 1e-2  # FlashAttention's kernel: bf16 rounding from torch's


# Compiles a call of the op ahead of time and saves it ("save"), or loads it in a new process and prints
# its difference from SDPA ("load"), the way a restarted ComfyUI runs a saved graph of a flash-attn-4 model.
SAVE_OR_LOAD = textwrap.dedent("""
    import sys
    import torch
    from diffboost.backends import saved_graph
    from diffboost.backends.flash_attention import flash_attention
    from diffboost.backends.inductor import _counting_inductor
    from diffboost.backends.options import CompileOptions

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return flash_attention(q, k, v, 0.25) * 2

    path, step = sys.argv[1], sys.argv[2]
    q, k, v = (torch.randn(1, 64, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    model = Attention()
    if step == "save":
        backend = _counting_inductor(CompileOptions(), lambda: None)
        fn = saved_graph._compile_ahead(type(model).forward, ((model, q, k, v), {}), backend,
                                        lambda entries: [not e.is_global for e in entries])
        fn.save_compiled_function(path)
    else:
        with open(path, "rb") as f:
            fn = saved_graph._deserialize(f.read(), {})
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=0.25)
        print(float((fn(model, q, k, v) - ref.transpose(1, 2) * 2).abs().max()))
""")


@pytest.mark.skipif(not saved_graph.supported(), reason="this torch cannot save a compiled call")
def test_a_saved_graph_holding_the_op_runs_in_a_new_process(tmp_path):
    path = tmp_path / "attention.graph"
    for step in ("save", "load"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{step}")}
        done = subprocess.run([sys.executable, "-c", SAVE_OR_LOAD, str(path), step], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
