"""The mode string parser and the options built from the node's widgets (no ComfyUI needed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffboost.backends import CompileOptions, ConfigError, parse_mode
from diffboost.backends.inductor import inductor_settings
from diffboost.backends.modes import FLAGS, PRESETS, TORCH_MODES

SEED_MODES = [
    "max-optimize:max-autotune:freezing:benchmark:low-precision:cudagraphs:cache-all",
    "max-optimize:max-autotune:low-precision:cache-all",
    "max-optimize:max-autotune:freezing:benchmark:cudagraphs",
    "max-optimize:max-autotune:low-precision",
    "max-autotune",
    "jit:disable-runtime-fusion",
    "O2",
    "O3",
]


@pytest.mark.parametrize("text", SEED_MODES)
def test_every_mode_string_from_the_seeds_parses(text):
    mode = parse_mode(text)
    assert mode.text == text and mode.flags()


def test_flags_presets_and_torch_modes_mean_what_they_say():
    full = parse_mode(SEED_MODES[0])
    assert set(full.flags()) == {"max-optimize", "max-autotune", "freezing", "benchmark", "low-precision",
                                 "cudagraphs", "cache-all"}
    assert parse_mode("O3").cudagraphs and parse_mode("O3").low_precision
    assert parse_mode("O2").cudagraphs and not parse_mode("O2").low_precision
    assert parse_mode("O2").fuse_rope and parse_mode("O3").fuse_rope
    assert parse_mode("O2").skip_rewrites and parse_mode("O3").skip_rewrites
    assert parse_mode("O2").quick_schedule and parse_mode("O3").quick_schedule
    assert parse_mode("O2").gelu_epilogue and parse_mode("O3").gelu_epilogue
    assert not parse_mode("O3").match_eager and not parse_mode("O3").multi_kernel
    assert not parse_mode("O3").flash_attn_4  # an optional package: opt-in, never in a preset
    assert "flash-attn-4" in parse_mode("O3:flash-attn-4").flags()
    assert parse_mode("reduce-overhead").flags() == ["cudagraphs"]
    assert parse_mode("max-autotune").flags() == ["max-autotune"]  # the seeds' flag wins over torch's mode
    assert parse_mode("max-autotune-no-cudagraphs").flags() == ["max-autotune"]
    assert parse_mode("O2:regional").regional


def test_inductor_settings_follow_the_flags():
    s = inductor_settings(parse_mode("max-optimize:max-autotune:freezing:cudagraphs"), "channels_last")
    assert s["max_autotune"] and s["coordinate_descent_tuning"] and s["conv_1x1_as_mm"] and s["freezing"]
    assert s["triton.cudagraphs"] and s["epilogue_fusion"] is False and s["layout_optimization"]
    assert inductor_settings(parse_mode("default")) == {}
    multi = inductor_settings(parse_mode("O3:multi-kernel"))
    assert multi["triton.multi_kernel"] == 1 and multi["fx_graph_cache"] is False  # cache-all overruled
    assert inductor_settings(parse_mode("O3"))["fx_graph_cache"] is True
    assert inductor_settings(parse_mode("O3:match-eager"))["emulate_precision_casts"] is True
    assert inductor_settings(parse_mode("O3:skip-rewrites"))["pattern_matcher"] is False
    assert "loop_ordering_after_fusion" not in inductor_settings(parse_mode("default"))
    quick = inductor_settings(parse_mode("O3"))
    assert quick["loop_ordering_after_fusion"] is False and quick["triton.autotune_pointwise"] is False
    assert quick["triton.coalesce_tiling_analysis"] is False


@pytest.mark.parametrize("text, message", [
    ("", "mode is empty"),
    ("   ", "mode is empty"),
    ("max-optimize::cudagraphs", "empty part"),
    ("max-optimise", "unknown part 'max-optimise'"),
    ("O4", "unknown part 'O4'"),
    ("jit:max-autotune", "contradicts itself"),
    ("jit:max-optimize", "contradicts itself"),
])
def test_malformed_or_contradictory_modes_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_mode(text)


def test_options_reject_unknown_widget_values():
    with pytest.raises(ConfigError, match="memory_format 'nhwc'"):
        CompileOptions.from_user("inductor", "O2", memory_format="nhwc")
    with pytest.raises(ConfigError, match="dynamic 'maybe'"):
        CompileOptions.from_user("inductor", "O2", dynamic="maybe")
    with pytest.raises(ConfigError, match="on_failure"):
        CompileOptions.from_user("inductor", "O2", on_failure="ignore")


WORDS = [*FLAGS, *PRESETS, *TORCH_MODES]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=12)), min_size=0, max_size=6))
def test_fuzzed_mode_strings_parse_or_raise_config_error(words):
    text = ":".join(words)
    try:
        mode = parse_mode(text)
    except ConfigError as e:
        assert str(e) and ("mode" in str(e))  # a message, never a crash of another kind
        return
    # What parsed is made only of known words, and parsing is stable.
    assert all(w.strip() in WORDS for w in text.strip().split(":"))
    assert parse_mode(text) == mode
