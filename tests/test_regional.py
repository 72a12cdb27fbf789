"""Block-by-block compilation (`regional`) on ComfyUI's own Flux: each block's compiled region writes only
buffers of its own. A region that writes into its arguments (ComfyUI's blocks do `img += ...`) is left
out of inductor's CUDA graph trees and launched kernel by kernel at every call."""

from __future__ import annotations

import pytest
import torch
from helpers.comfy_modules import comfy_flux

from diffboost.backends import CompileOptions, compile_module, parse_mode
from diffboost.backends.regional import compiled_block_by_block
from diffboost.measure.compare import relative_error

BLOCKS = ["double_blocks", "single_blocks"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()


def flux(blocks: int = 2):
    """The tiny Flux with `blocks` blocks of each kind, on ComfyUI's SDPA attention (the CPU's default
    attention asks for free memory: a graph break inside each block)."""
    from comfy.ldm.modules.attention import attention_pytorch

    net, kwargs = comfy_flux(blocks)
    override = {"optimized_attention_override": lambda func, *args, **kw: attention_pytorch(*args, **kw)}
    return net, {**kwargs, "transformer_options": override}


def _copies(args, kwargs) -> tuple[tuple, dict]:
    """`args` and `kwargs` with each tensor among them cloned."""
    copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(map(copy, args)), {k: copy(v) for k, v in kwargs.items()}


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


def block_arguments(net, kwargs, block) -> tuple[tuple, dict]:
    """What ComfyUI's Flux passes to `block` in an eager call (copies)."""
    seen = []

    def record(module, args, kw):
        seen.append(_copies(args, kw))

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            net(**kwargs)
    finally:
        handle.remove()
    return seen[0]


def call_and_see_what_it_wrote(fn, arguments):
    """`fn`'s outputs on copies of `arguments`, and for each tensor argument whether `fn` changed it."""
    args, kwargs = _copies(*arguments)
    before = [t.clone() for t in _tensors(args, kwargs)]
    with torch.no_grad():
        out = fn(*args, **kwargs)
    outs = [o.clone() for o in (out if isinstance(out, tuple) else (out,))]
    return outs, [not torch.equal(b, t) for b, t in zip(before, _tensors(args, kwargs), strict=True)]


@pytest.mark.parametrize("blocks", BLOCKS)
def test_a_compiled_block_leaves_its_arguments_as_they_were(comfy_host, blocks):
    net, kwargs = flux()
    block = getattr(net, blocks)[0]
    arguments = block_arguments(net, kwargs, block)
    expected, eager_wrote = call_and_see_what_it_wrote(block, arguments)
    assert any(eager_wrote)  # ComfyUI's block adds to its input in place
    _, plain_wrote = call_and_see_what_it_wrote(torch.compile(block, backend="inductor"), arguments)
    assert any(plain_wrote)  # and compiled as it is, so does its graph: what CUDA graph trees refuse

    stand_ins = compiled_block_by_block(net, lambda m, region: torch.compile(region, backend="inductor"))
    outs, wrote = call_and_see_what_it_wrote(getattr(stand_ins, blocks)[0], arguments)
    assert not any(wrote)
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected, strict=True):
        assert relative_error(out, ref) < 1e-5


def test_regional_flux_matches_eager_and_compiles_each_block_class_once(comfy_host):
    graphs = []
    for blocks in (2, 3):
        torch._dynamo.reset()
        net, kwargs = flux(blocks)
        with torch.no_grad():
            expected = net(**kwargs)
            compiled = compile_module(net, CompileOptions(mode=parse_mode("regional")))
            out = compiled(**kwargs)
        assert relative_error(out, expected) < 1e-5
        graphs.append(compiled.stats.graphs_compiled)
    assert graphs[0] == graphs[1] > 0  # a third block of each kind compiles nothing more


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="!!! NO CUDA GPU: regional Flux under CUDA graphs was SKIPPED !!!")
def test_on_the_gpu_every_regional_flux_block_is_captured_by_cuda_graphs(comfy_host):
    from torch._dynamo.utils import counters

    net, kwargs = flux()  # without the graph break that the tests' CPU-mode host's attention has
    net = net.to("cuda", torch.bfloat16)
    on_gpu = lambda v: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype)  # noqa: E731
    kwargs = {k: on_gpu(v) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    counters.clear()
    with torch.no_grad():
        expected = net(**kwargs)
        compiled = compile_module(net, CompileOptions(mode=parse_mode("O3:regional")))
        outs = [compiled(**kwargs) for _ in range(4)]  # warm-up, recording, then replays
    assert counters["inductor"]["cudagraph_skips"] == 0
    for out in outs:
        assert relative_error(out, expected) < 2e-2  # bf16, fused differently from eager
