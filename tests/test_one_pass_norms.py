"""one-pass-norms: inductor's heuristics with row-wise normalisations up to 4096 wide in one pass,
installed only while Compile Model's graphs compile, and part of inductor's cache key."""

from __future__ import annotations

import pytest
import torch
from helpers.compile_caches import without_compile_caches

from diffboost.backends import CompileOptions, compile_module, one_pass_norms
from diffboost.backends.inductor import inductor_settings
from diffboost.backends.modes import parse_mode
from diffboost.measure.compare import relative_error


class NormThenLinear(torch.nn.Module):
    def __init__(self, width: int = 1536):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.linear = torch.nn.Linear(width, 32)

    def forward(self, x, residual):
        return self.linear(self.norm(x + residual))


def _inputs(width: int = 1536, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, width, generator=g).to(device) for _ in range(2)]


def test_the_heuristics_are_on_while_compile_model_compiles_and_off_after():
    """A post-grad pass runs inside inductor's compile: it sees the heuristics there; outside, inductor's
    own are back, so a compile that did not ask for them is not changed."""
    from torch._inductor.virtualized import V

    seen = []
    model, (x, residual) = NormThenLinear().eval(), _inputs()
    with torch._inductor.config.patch(post_grad_custom_post_pass=lambda graph: seen.append(type(V.choices))), \
            without_compile_caches(), torch.no_grad():
        out = compile_module(model, CompileOptions.from_user("inductor", "O3"))(x, residual)
        assert relative_error(out, model(x, residual)) < 1e-5
        torch.compile(NormThenLinear().eval(), backend="inductor")(x, residual)
    assert seen == [one_pass_norms.OnePassNorms, type(V.choices)]
    assert type(V.choices) is not one_pass_norms.OnePassNorms


def test_the_mode_puts_the_heuristics_into_inductor_s_cache_key():
    """A graph compiled with the heuristics must not be served to a compile without them, or back."""
    from torch._inductor import config

    with_flag = inductor_settings(parse_mode("O3"))
    without = inductor_settings(parse_mode("cudagraphs"))
    assert "inductor_choices_class" not in without
    if not hasattr(config, "inductor_choices_class"):
        pytest.fail("this torch has no inductor_choices_class: the heuristics would not be in the cache key")
    assert with_flag["inductor_choices_class"] is one_pass_norms.OnePassNorms
    with config.patch(with_flag):
        keyed = config.save_config_portable() if hasattr(config, "save_config_portable") else config.get_config_copy()
    assert "diffboost-one-pass-norms" in repr(keyed) or "OnePassNorms" in repr(keyed), repr(keyed)[:2000]


# O3 without the flag, spelled out.
WITHOUT = "cudagraphs:low-precision:benchmark:cache-all:fuse-rope:skip-rewrites:quick-schedule:gelu-epilogue:joint-qkv"


def test_o2_and_o3_have_it():
    assert parse_mode("O2").one_pass_norms and parse_mode("O3").one_pass_norms
    assert set(parse_mode(WITHOUT).flags()) == set(parse_mode("O3").flags()) - {"one-pass-norms"}


def _kernels_for(width: int, mode: str) -> str:
    from torch._inductor.utils import run_and_get_code

    model, (x, residual) = NormThenLinear(width).cuda().eval(), _inputs(width, "cuda")
    with without_compile_caches(), torch.no_grad():
        compiled = compile_module(model, CompileOptions.from_user("inductor", mode))
        out, code = run_and_get_code(compiled, x, residual)
        assert relative_error(out, model(x, residual)) < 1e-3
    return "\n".join(code)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="!!! NO CUDA GPU: the kernels one-pass-norms writes on the GPU were SKIPPED !!!")
@pytest.mark.parametrize("width", [1152, 1536, 3072])
def test_on_the_gpu_a_wide_norm_becomes_one_pass_and_a_wider_one_does_not(width):
    """The layer norm over PixArt's, SD3's and Flux's widths: two passes (`triton_red_`) with inductor's
    heuristics, one (`triton_per_`) with the flag."""
    inductor_s = _kernels_for(width, WITHOUT)
    assert "triton_red_fused" in inductor_s and "triton_per_fused" not in inductor_s
    assert "triton_per_fused" in _kernels_for(width, "O3")
    wider = _kernels_for(2 * one_pass_norms.WIDEST_ROW, "O3")
    assert "triton_red_fused" in wider
