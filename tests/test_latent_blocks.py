"""A `dynamic` compile takes the latent as blocks of 8x8 (backends/latent_blocks.py): the same outputs,
one graph for every size whose sides are multiples of 8, simpler index arithmetic than a plain dynamic
compile, and one more graph for the sizes that do not split. Plain torch, inductor on the CPU."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.compile_caches import without_compile_caches

from diffboost.backends import CompileOptions, compile_module
from diffboost.backends.inductor import without_duck_sizing
from diffboost.backends.latent_blocks import LatentInBlocks, as_blocks, splits_into_blocks


class DownUp(torch.nn.Module):
    """A UNet's shape in small: stride-2 convolutions down, group norms, nearest upsampling back."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.down1 = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.down2 = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.norm1, self.norm2 = torch.nn.GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
        self.out = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x, scale=None):
        h0 = self.inp(x)
        h1 = torch.nn.functional.silu(self.norm1(self.down1(h0)))
        h2 = torch.nn.functional.silu(self.norm2(self.down2(h1)))
        up = torch.nn.functional.interpolate(h2, size=h1.shape[-2:]) + h1
        up = torch.nn.functional.interpolate(up, size=h0.shape[-2:]) + h0
        out = self.out(up)
        return out if scale is None else out * scale


def down_up():
    torch.manual_seed(0)
    return DownUp().eval()


def test_blocks_are_a_view_that_merges_back_to_the_latent():
    model = down_up()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 4, 16, 24).contiguous(memory_format=fmt)
        blocks = as_blocks(x)
        assert blocks.shape == (2, 4, 2, 8, 3, 8)
        assert blocks.data_ptr() == x.data_ptr()  # a view: nothing copied
        assert torch.equal(blocks.flatten(4, 5).flatten(2, 3), x)
        with torch.no_grad():
            assert torch.equal(LatentInBlocks(model)(blocks, scale=2.0), model(x, scale=2.0))


@pytest.mark.parametrize("shape, splits", [((1, 4, 16, 24), True), ((2, 4, 64, 128), True),
                                           ((1, 4, 8, 16), False),  # one block high: a side of 1
                                           ((1, 4, 20, 24), False), ((1, 4, 16, 16, 16), False)])
def test_which_latents_split_into_blocks(shape, splits):
    assert splits_into_blocks(torch.zeros(shape)) is splits


def test_a_dynamic_compile_serves_every_size_that_splits_with_one_graph_and_the_others_with_one_more(caplog):
    caplog.set_level("INFO", logger="diffboost")
    torch._dynamo.reset()
    model = down_up()
    compiled = compile_module(model, CompileOptions.from_user("inductor", "default", dynamic="on"))
    # Square first (its sides must stay two symbols), portrait, landscape, odd block counts, a batch of 4.
    splitting = [(2, 32, 32), (2, 16, 24), (2, 24, 16), (2, 24, 40), (4, 32, 32)]
    with torch.no_grad():
        for i, (batch, h, w) in enumerate(splitting):
            x = torch.randn(batch, 4, h, w)
            assert torch.allclose(compiled(x, scale=1.5), model(x, scale=1.5), atol=1e-4), (batch, h, w)
            if i == 0:
                # One trace: the norm's eps is a constant, not a float symbol that restarts the trace.
                assert compiled.stats.graphs_compiled == 1
        assert compiled.stats.graphs_compiled == 1, "a size whose sides are multiples of 8 recompiled"
        assert "does not split" not in caplog.text
        for batch, h, w in [(2, 20, 28), (2, 36, 12)]:  # sides not multiples of 8: the plain dynamic graph
            x = torch.randn(batch, 4, h, w)
            assert torch.allclose(compiled(x, scale=1.5), model(x, scale=1.5), atol=1e-4), (batch, h, w)
        assert compiled.stats.graphs_compiled == 2, "the sizes that do not split: one more compile"
    assert caplog.text.count("a latent of 20x28 does not split into 8x8 blocks") == 1  # said once, not per call


def _floor_divisions(fn, *args) -> int:
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad(), without_compile_caches():  # a graph from the cache on disk shows no code
        _, codes = run_and_get_code(fn, *args)
    return len(re.findall(r"div_floor_integer|//", "\n".join(codes)))


def test_blocks_take_the_run_time_divisions_out_of_the_generated_code():
    """What the blocks are for: after each stride-2 convolution a plain dynamic compile computes
    (h - 1) // 2 + 1 in its kernels; with the latent in blocks the sizes are exact multiples."""
    model = down_up()
    x = torch.randn(2, 4, 32, 48)
    torch._dynamo.reset()
    plain = without_duck_sizing(torch.compile(model, dynamic=True))
    in_blocks = without_duck_sizing(torch.compile(LatentInBlocks(model), dynamic=True))
    plain_divisions = _floor_divisions(plain, x)
    block_divisions = _floor_divisions(in_blocks, as_blocks(x))
    assert block_divisions < plain_divisions / 2, (block_divisions, plain_divisions)


def test_a_model_loaded_again_reuses_the_dynamic_graphs_in_blocks():
    """The blocks wrapper is new at each compile; the graphs built for an earlier model of the same
    layout still serve a new one (its own weights), as they do without the blocks."""
    torch._dynamo.reset()
    options = CompileOptions.from_user("inductor", "default", dynamic="on")
    x = torch.randn(2, 4, 32, 24)
    with torch.no_grad():
        first = compile_module(down_up(), options)
        first(x)
        assert first.stats.graphs_compiled >= 1
        reloaded = down_up()
        reloaded.out.weight.mul_(-1)  # other weights, as another checkpoint of the same model
        again = compile_module(reloaded, options)
        assert torch.allclose(again(x), reloaded(x), atol=1e-4)
        assert again.stats.graphs_compiled == 0
