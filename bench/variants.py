"""The variants the bench compares, one registry entry each: how to turn the eager model into the
variant in process (`apply`), and, for `--server`, which nodes to put before the Benchmark
Sampler (`graph`). A new variant (diffboost FP8, a new backend) is one `register(...)` call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends import registry as backend_registry
from ..backends.modes import PRESETS


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    # (base ModelPatcher, BenchModel) -> a ModelPatcher to measure. Must not change the base.
    apply: Callable[[object, object], object]
    # None when the variant can run here; otherwise why not (shown in its row).
    unavailable: Callable[[], str | None] = lambda: None
    # (PromptBuilder, model link) -> model link, for --server; None: not available through the API.
    graph: Callable | None = None
    default: bool = True  # run when --variants is not given
    # Compiled by diffboost, so it keeps its artifacts in --compile-cache (and --restart measures it again).
    cached: bool = False


VARIANTS: dict[str, Variant] = {}

# Where diffboost's variants keep compiled artifacts (Compile Model's compile_cache), set by
# `diffboost-bench --compile-cache DIR`; None: no persistent cache, as the node's "off".
COMPILE_CACHE_DIR: str | None = None


def compile_cache():
    from ..backends import CompileCache

    return CompileCache(COMPILE_CACHE_DIR) if COMPILE_CACHE_DIR else None


def register(variant: Variant) -> Variant:
    VARIANTS[variant.name] = variant
    return variant


def names(default_only: bool = False) -> list[str]:
    return [n for n, v in VARIANTS.items() if v.default or not default_only]


def select(spec: str | None) -> list[Variant]:
    """The variants named in a comma-separated `spec` (all default ones when None), eager first so
    the others can be compared with it. `diffboost=MODE` and `diffboost-fp8=MODE` name Compile Model
    (inductor) with any mode string, without or with Quantize FP8 before it. Both take Compile Model's
    other inputs as `;dynamic=on`, `;memory_format=channels_last`, `;fuse_qkv=1`, and `;conds=per-step`
    (ComfyUI's per-step conditioning copies left in place, for comparison); the latter also `;min=M`
    (min_weights_millions), `;skip=PATTERN` (one more ignore pattern, repeatable) and `;unskip=PATTERN`
    (one of the default ignore patterns taken off the list, repeatable), `;fuse_gelu=0` (GELUs left to the model).
    Raises ValueError naming an unknown variant or a bad mode string."""
    wanted = names(default_only=True) if not spec else [s.strip() for s in spec.split(",") if s.strip()]
    for name in wanted:
        if "=" in name and name not in VARIANTS:
            register(_custom_mode_variant(name))
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    wanted = sorted(dict.fromkeys(wanted), key=lambda n: n != "eager")
    return [VARIANTS[n] for n in wanted]


# --- eager --------------------------------------------------------------------------------------

register(Variant("eager", "ComfyUI as it is: no compilation, no quantization",
                 apply=lambda base, bm: base.clone(), graph=lambda pb, model: model))


# --- ComfyUI's own TorchCompileModel ------------------------------------------------------------

def _comfy_compile(base, bm):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from ..backends.inductor import keep_transformer_options_unguarded

    m = base.clone()
    # The options ComfyUI's own TorchCompileModel node passes.
    set_torch_compile_wrapper(m, backend="inductor", options={"guard_filter_fn": keep_transformer_options_unguarded})
    return m


register(Variant("comfy-compile", "ComfyUI's TorchCompileModel (torch.compile, inductor)", apply=_comfy_compile,
                 graph=lambda pb, model: pb.add("TorchCompileModel", model=model, backend="inductor")))


# --- diffboost compile presets, one per available backend ---------------------------------------

def _diffboost_compile(backend: str, mode: str, settings: dict | None = None):
    settings = settings or {}

    def apply(base, bm):
        from ..backends import CompileOptions
        from ..nodes.patching import with_boost

        return with_boost(base, compile_options=CompileOptions.from_user(backend, mode, **settings),
                          compile_label=f"{bm.name} diffusion model (bench)", compile_cache=compile_cache())

    def graph(pb, model):
        return pb.add("DiffBoostCompileModel", model=model, backend=backend, mode=mode, on_failure="fail",
                      **settings)

    return apply, graph


for _backend in backend_registry.names():
    for _preset in PRESETS:
        _name = f"diffboost-{_preset}" if _backend == "inductor" else f"diffboost-{_backend}-{_preset}"
        _apply, _graph = _diffboost_compile(_backend, _preset)
        register(Variant(_name, f"diffboost Compile Model, backend {_backend}, mode {_preset}", apply=_apply,
                         unavailable=lambda b=_backend: backend_registry.availability().get(b),
                         graph=_graph, default=_backend == "inductor", cached=True))


# --- ComfyUI's native FP8 (weight_dtype fp8_e4m3fn_fast) ----------------------------------------

def _fp8_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "ComfyUI's fp8 matmuls need a CUDA GPU with FP8 (compute capability 8.9+); this run has none"
    import comfy.model_management

    if not comfy.model_management.supports_fp8_compute(comfy.model_management.get_torch_device()):
        return f"{torch.cuda.get_device_name()} has no FP8 matrix multiply (needs compute capability 8.9+)"
    return None


def _comfy_fp8(base, bm):
    from .models import fp8_twin

    return fp8_twin(base)  # a separate model: fp8 weights cannot be a clone of bf16 ones


register(Variant("comfy-fp8", "ComfyUI's native FP8 (fp8_e4m3fn weights, fp8_optimizations)",
                 apply=_comfy_fp8, unavailable=_fp8_unavailable, graph=None))


# --- diffboost FP8: registered once diffboost.quant offers a quantizer ---------------------------

@dataclasses.dataclass(frozen=True)
class Fp8Settings:
    """Quantize FP8's inputs as a variant names them: `min=M`, `skip=PATTERN`, `unskip=PATTERN`, `fuse_gelu=0`."""

    min_weights_millions: float | None = None  # None: the node's default
    skip: tuple[str, ...] = ()  # added to the default ignore list
    unskip: tuple[str, ...] = ()  # default ignore patterns taken off it
    fuse_gelu: bool = True


def _diffboost_fp8(mode: str | None, settings: Fp8Settings = Fp8Settings(), compile_settings: dict | None = None):
    def apply(base, bm):
        from ..backends import CompileOptions
        from ..nodes.fp8_lifetime import add_fp8_callbacks
        from ..nodes.patching import with_boost
        from ..quant import DEFAULT_MIN_WEIGHTS_MILLIONS, Fp8Quantizer, QuantConfig, choose_layers

        ignore = ", ".join(ignore_list(settings.skip, settings.unskip))
        minimum = settings.min_weights_millions
        minimum = DEFAULT_MIN_WEIGHTS_MILLIONS if minimum is None else minimum
        config = QuantConfig.from_user("rowwise", ignore=ignore, fuse_gelu=settings.fuse_gelu,
                                       min_weights_millions=minimum)
        summary = choose_layers(base.get_model_object("diffusion_model"), config).summary()
        changes = {"quantizer": Fp8Quantizer(config), "quantization": summary}
        if mode is not None:
            changes.update(compile_options=CompileOptions.from_user("inductor", mode, **(compile_settings or {})),
                           compile_label=f"{bm.name} diffusion model (bench)", compile_cache=compile_cache())
        m = with_boost(base, **changes)
        # The node's callbacks: among them, the FP8 copies leave the GPU when the model does, so that
        # the next variant's peak memory does not hold this one's.
        add_fp8_callbacks(m)
        return m

    return apply


# Compile Model's other inputs, as a variant names them: `dynamic=on`, `memory_format=channels_last`, `fuse_qkv=1`.
COMPILE_SETTINGS = ("dynamic", "memory_format", "fuse_qkv")


def _compile_settings(name: str, parts: list[str]) -> tuple[dict, list[str]]:
    """(Compile Model inputs named in `parts`, the parts left over). Raises ValueError on a bad value."""
    from ..backends.errors import ConfigError
    from ..backends.options import CompileOptions

    settings, rest = {}, []
    for part in parts:
        key, _, value = part.partition("=")
        if key not in COMPILE_SETTINGS:
            rest.append(part)
            continue
        settings[key] = value in ("1", "true", "on") if key == "fuse_qkv" else value
    try:
        CompileOptions.from_user("inductor", "O2", **settings)
    except ConfigError as e:
        raise ValueError(f"variant '{name}': {e}") from None
    return settings, rest


def ignore_list(skip: tuple[str, ...] = (), unskip: tuple[str, ...] = ()) -> list[str]:
    """Quantize FP8's default ignore patterns without `unskip`, plus `skip`. Raises ValueError for an
    `unskip` pattern that is not one of the defaults."""
    from ..quant import DEFAULT_IGNORE
    from ..quant.config import parse_patterns

    defaults = parse_patterns(DEFAULT_IGNORE)
    unknown = [p for p in unskip if p not in defaults]
    if unknown:
        raise ValueError(f"unskip={unknown[0]} is not one of Quantize FP8's default ignore patterns: "
                         f"{', '.join(defaults)}")
    return [p for p in defaults if p not in unskip] + list(skip)


def _fp8_settings(name: str, parts: list[str]) -> Fp8Settings:
    """`min=M` (Quantize FP8's min_weights_millions), `skip=PATTERN` (added to the ignore list),
    `unskip=PATTERN` (one of the default ignore patterns, taken off it) and `fuse_gelu=0` (FP8 layers
    leave the GELU in front of them to the model)."""
    minimum, skip, unskip, fuse_gelu = None, [], [], True
    for part in parts:
        key, _, value = part.partition("=")
        if key == "min":
            try:
                minimum = float(value)
            except ValueError:
                raise ValueError(f"variant '{name}': min={value} is not a number of millions of weights") from None
        elif key == "skip" and value:
            skip.append(value)
        elif key == "unskip" and value:
            unskip.append(value)
        elif key == "fuse_gelu" and value in ("0", "1"):
            fuse_gelu = value == "1"
        else:
            raise ValueError(f"variant '{name}': '{part}' is none of min=MILLIONS, skip=PATTERN, unskip=PATTERN, "
                             "fuse_gelu=0|1, "
                             f"{', '.join(k + '=VALUE' for k in COMPILE_SETTINGS)}")
    try:
        ignore_list(tuple(skip), tuple(unskip))
    except ValueError as e:
        raise ValueError(f"variant '{name}': {e}") from None
    return Fp8Settings(minimum, tuple(skip), tuple(unskip), fuse_gelu)


def _conditioning_per_step(apply):
    """`apply`, with ComfyUI's per-step conditioning copies left in place (the A/B of what
    diffboost's conditioning_on_device buys)."""
    def without_move(base, bm):
        from comfy.patcher_extension import WrappersMP

        from ..nodes.patching import WRAPPER_KEY

        m = apply(base, bm)
        m.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
        return m

    return without_move


def _custom_mode_variant(name: str) -> Variant:
    from ..backends.errors import ConfigError
    from ..backends.modes import parse_mode

    kind, spec = name.split("=", 1)
    mode, *settings = spec.split(";")
    try:
        parse_mode(mode)
    except ConfigError as e:
        raise ValueError(f"variant '{name}': {e}") from None
    compile_settings, settings = _compile_settings(name, settings)
    extra = "".join(f", {k} {v}" for k, v in compile_settings.items())
    per_step = "conds=per-step" in settings
    settings = [s for s in settings if s != "conds=per-step"]
    if kind == "diffboost" and not settings:
        apply, graph = _diffboost_compile("inductor", mode, compile_settings)
        variant = Variant(name, f"diffboost Compile Model, backend inductor, mode {mode}{extra}", apply=apply,
                          graph=graph, default=False, cached=True)
    elif kind == "diffboost-fp8":
        variant = Variant(name, f"diffboost Quantize FP8 then Compile Model, mode {mode}{extra}",
                          apply=_diffboost_fp8(mode, _fp8_settings(name, settings), compile_settings),
                          unavailable=_fp8_unavailable, default=False, cached=True)
    else:
        raise ValueError(f"variant '{name}': only diffboost=MODE[;dynamic=on|off|auto]"
                         "[;memory_format=channels_last][;fuse_qkv=1] and diffboost-fp8=MODE[;min=M]"
                         "[;skip=PATTERN][;unskip=PATTERN][;fuse_gelu=0][;...the same] take a mode; "
                         "both also [;conds=per-step]")
    if not per_step:
        return variant
    # In process only: a server graph has no input that leaves the per-step copies in place.
    return dataclasses.replace(variant, summary=f"{variant.summary}, conditioning copied at every step as ComfyUI does",
                               apply=_conditioning_per_step(variant.apply), graph=None)


register(Variant("diffboost-fp8", "diffboost Quantize FP8 (W8A8 rowwise, default layers), not compiled",
                 apply=_diffboost_fp8(None), unavailable=_fp8_unavailable, default=False))
register(Variant("diffboost-fp8-O3", "diffboost Quantize FP8 then Compile Model O3",
                 apply=_diffboost_fp8("O3"), unavailable=_fp8_unavailable, default=False, cached=True))
