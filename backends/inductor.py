"""The `inductor` backend: torch.compile, with the mode string mapped to inductor settings.

| mode flag       | inductor setting (per compile, never process-wide)                              |
|-----------------|----------------------------------------------------------------------------------|
| max-autotune    | max_autotune                                                                     |
| max-optimize    | coordinate_descent_tuning, coordinate_descent_check_all_directions,              |
|                 | conv_1x1_as_mm, epilogue_fusion=False (diffusion-fast's recipe)                  |
| cudagraphs      | triton.cudagraphs (inductor's CUDA graph trees)                                  |
| freezing        | freezing (weights become constants: LoRA changes after compile are not seen)     |
| cache-all       | fx_graph_cache, autotune_local_cache                                             |
| jit             | max_autotune=False, coordinate_descent_tuning=False                              |
| low-precision   | run time: reduced-precision fp16/bf16 matmul reductions, TF32 (restored after)   |
| benchmark       | run time: cudnn.benchmark (restored after)                                       |
| regional        | each repeated block compiled once, reused by all its instances (regional.py)     |
| fuse-rope       | graph pass: comfy_kitchen's RoPE ops become plain torch that inductor fuses      |
| flash-attn-4    | graph pass: long self-attention calls go to FlashAttention's CuTe kernels        |
| gelu-epilogue   | graph pass: linear + tanh-GELU becomes one cuBLAS matmul with a GELU epilogue    |
| multi-kernel    | triton.multi_kernel=1 (persistent and looped reductions, the faster one kept);   |
|                 | fx_graph_cache=False and no saved graph (torch 2.11 cannot load them back)       |
| skip-rewrites   | pattern_matcher=False (no pattern-matching passes on the traced graph)            |
| match-eager     | emulate_precision_casts (fused kernels round each step to fp16/bf16 as eager does) |
| channels_last   | layout_optimization, force_layout_optimization; 4-D inputs passed in channels_last |

With `dynamic` on (whole-model compiles), the latent is passed as blocks of 8x8 (latent_blocks.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from . import saved_graph
from .base import Backend
from .cache import parameter_layout
from .flash_attention import use_flash_attention
from .fuse import fuse_parallel_linears
from .gelu_epilogue import use_gelu_epilogue
from .joint_qkv import use_joint_qkv
from .latent_blocks import LatentInBlocks, dispatching
from .modes import CompileMode
from .options import CompileOptions
from .regional import compiled_block_by_block
from .rope import fuse_rope
from .runtime import RECOMPILE_LIMIT


def inductor_settings(mode: CompileMode, memory_format: str = "preserve") -> dict:
    """The inductor config patches a mode asks for (only keys this torch knows)."""
    s: dict = {}
    if mode.max_autotune:
        s["max_autotune"] = True
    if mode.max_optimize:
        s.update(coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True,
                 conv_1x1_as_mm=True, epilogue_fusion=False)
    if mode.cudagraphs:
        s["triton.cudagraphs"] = True
    if mode.freezing:
        s["freezing"] = True
    if mode.cache_all:
        s.update(fx_graph_cache=True, autotune_local_cache=True)
    if mode.jit:
        s.update(max_autotune=False, coordinate_descent_tuning=False)
    if mode.multi_kernel:
        # Not from inductor's cache: torch 2.11 raised a TypeError loading these kernels from it in a
        # new process (PixArt O3:multi-kernel on an H200), and the model then ran uncompiled.
        s.update({"triton.multi_kernel": 1, "fx_graph_cache": False})
    if mode.skip_rewrites:
        s["pattern_matcher"] = False
    if mode.quick_schedule:
        s.update({"loop_ordering_after_fusion": False, "triton.coalesce_tiling_analysis": False,
                  "triton.autotune_pointwise": False})
    if mode.match_eager:
        s["emulate_precision_casts"] = True
    if mode.one_pass_norms:
        from . import one_pass_norms

        s.update(one_pass_norms.settings())
    if memory_format == "channels_last":
        # Forced: inductor's own heuristic declines channels-last convolutions whenever a size is
        # symbolic (pytorch#102670), so a `dynamic` UNet would otherwise run them all in NCHW.
        s.update(layout_optimization=True, force_layout_optimization=True)
    from torch._inductor import config

    known = config.get_config_copy()
    return {k: v for k, v in s.items() if k.replace("-", "_") in known}


class _CountingInductor(torch._TorchCompileInductorWrapper):
    """Inductor that reports each graph it compiles and applies the graph passes we own."""

    def __init__(self, settings: dict, dynamic: bool | None, graph_passes: list[Callable[[torch.fx.GraphModule], int]],
                 on_graph: Callable[[], None]):
        super().__init__(None, settings, dynamic)
        self._graph_passes = graph_passes
        self.count_to(on_graph)

    def count_to(self, on_graph: Callable[[], None]) -> None:
        """Report the graphs compiled from now on to `on_graph` (the newest compile reusing this one)."""
        self._on_graph = on_graph

    # Compiled code is shared between torch.compile calls whose backends compare equal; each
    # compiled model owns its graphs (its own options, its own count), so compare by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __call__(self, model_, inputs_, **kwargs):
        self._on_graph()
        for graph_pass in self._graph_passes:
            graph_pass(model_)
        with self._heuristics():
            return super().__call__(model_, inputs_, **kwargs)

    def _heuristics(self) -> AbstractContextManager:
        """The heuristics class the settings name, installed for this compile: inductor reads that setting
        only once per thread, when nothing is installed yet, so the setting alone would not take effect."""
        choices = self.config.get("inductor_choices_class")
        if choices is None:
            return nullcontext()
        from torch._inductor.virtualized import V

        return V.set_choices_handler(choices())


def graph_passes(options: CompileOptions) -> list[Callable[[torch.fx.GraphModule], int]]:
    """The passes `options` ask for on each captured graph, in the order they run."""
    mode = options.mode
    wanted = [(options.fuse_qkv, fuse_parallel_linears), (mode.fuse_rope, fuse_rope),
              (mode.flash_attn_4, use_flash_attention), (mode.gelu_epilogue, use_gelu_epilogue),
              (mode.joint_qkv, use_joint_qkv)]
    return [graph_pass for on, graph_pass in wanted if on]


def _counting_inductor(options: CompileOptions, on_graph: Callable[[], None]) -> _CountingInductor:
    """The inductor backend `options` ask for, reporting each graph to `on_graph`."""
    return _CountingInductor(inductor_settings(options.mode, options.memory_format), options.dynamic_flag,
                             graph_passes(options), on_graph)


# transformer_options entries that change between prompts (the sampler's wrappers and callbacks, the
# noise schedule, per-prompt ids) without changing the denoiser's code.
VOLATILE_TRANSFORMER_OPTIONS = ("wrappers", "callbacks", "sigmas", "sample_sigmas", "uuids")


def keep_transformer_options_unguarded(guard_entries) -> list[bool]:
    """Drop the guards on transformer_options' volatile entries: guarding on them recompiles for
    nothing. Its other entries stay guarded: an attention patch (IP-Adapter) added after the compile
    must recompile, not be silently left out of the compiled graph."""
    return [not any(f"['{key}']" in entry.name for key in VOLATILE_TRANSFORMER_OPTIONS) for entry in guard_entries]


# Per (module class, parameter layout, compile options): the dynamo context of the latest compile and
# its backend. Compiling such a module again (Compile Model running anew after an upstream change, the
# same checkpoint loaded again, each instance of a repeated block) goes through that context, where
# dynamo finds the graphs already built; their guards check that they apply to this module (its
# parameters are graph inputs), and only what they do not cover is compiled. A context holds no module;
# its graphs stay until torch._dynamo.reset(), as torch keeps every compile's graphs anyway.
_EARLIER_COMPILES: dict[tuple, tuple] = {}


def layout_key(module: torch.nn.Module, options: CompileOptions) -> tuple:
    """What decides whether an earlier compile's graphs may serve `module`: its class, its parameters'
    names, shapes and dtypes, and the options that change the graphs (on_failure does not)."""
    return type(module), parameter_layout(module), dataclasses.replace(options, on_failure="")


def _reusable(options: CompileOptions) -> bool:
    # Frozen graphs hold the weights of their first call as constants: a new LoRA needs new graphs.
    return not options.mode.freezing


class InductorBackend(Backend):
    name = "inductor"
    summary = "torch.compile with inductor (built into PyTorch)"

    def compile(self, module: torch.nn.Module, options: CompileOptions,
                on_graph: Callable[[], None]) -> Callable:
        backend = _counting_inductor(options, on_graph)
        kwargs = {}
        accepted = inspect.signature(torch.compile).parameters
        if "recompile_limit" in accepted:
            # Each resolution/batch may add a graph; keep more than dynamo's default of 8 per model.
            kwargs["recompile_limit"] = RECOMPILE_LIMIT
        if "isolate_recompiles" in accepted:
            kwargs["isolate_recompiles"] = True  # other compiles of the same class don't count against us

        def compile_one(m: torch.nn.Module, region: torch.nn.Module | None = None):
            # `region` (default `m`) is what is compiled; `m`'s class and layout key the reuse.
            region = m if region is None else region
            key = layout_key(m, options) if _reusable(options) else None
            earlier = _EARLIER_COMPILES.get(key)
            if earlier is not None:
                context, counting = earlier
                counting.count_to(on_graph)
                return context(region)
            compiled = torch.compile(region, backend=backend, dynamic=options.dynamic_flag,
                                     options={"guard_filter_fn": keep_transformer_options_unguarded}, **kwargs)
            context = getattr(compiled, "dynamo_ctx", None)
            if key is not None and context is not None:
                _EARLIER_COMPILES[key] = (context, backend)
            return compiled

        return without_duck_sizing(self._compiled(module, options, compile_one))

    @staticmethod
    def _compiled(module: torch.nn.Module, options: CompileOptions, compile_one: Callable) -> Callable:
        if options.mode.regional:
            # One compile per block class and layout serves every instance: params are graph inputs.
            compiled = compiled_block_by_block(module, compile_one)
        elif options.dynamic == "on":
            # The latent's sides as multiples of 8: the downsampled sizes stay exact (latent_blocks.py).
            compiled = dispatching(compile_one(LatentInBlocks(module)), compile_one(module))
        else:
            compiled = compile_one(module)
        # Floats are constants in a dynamic compile too, so that torch traces the model once.
        return with_floats_as_constants(compiled) if options.dynamic == "on" else compiled

    def saved_graphs(self, module: torch.nn.Module, options: CompileOptions, on_graph: Callable[[], None],
                     root, key: str):
        # Whole-model compiles only: block-by-block compiles trace in seconds anyway, frozen graphs
        # hold one set of weights, a dynamic-shape graph is not what the first call saves, and
        # multi-kernel graphs do not load in a new process (inductor_settings).
        mode = options.mode
        if mode.regional or mode.freezing or mode.multi_kernel or options.dynamic == "on" \
                or not saved_graph.supported():
            return None
        return saved_graph.SavedGraphs(module, _counting_inductor(options, on_graph),
                                       keep_transformer_options_unguarded, root, key)


def without_duck_sizing(compiled: Callable) -> Callable:
    """`compiled`, traced with duck sizing off. Duck sizing gives sizes that are equal at the first
    compile one symbol (a square latent's height and width), so every other aspect ratio recompiles."""
    from torch.fx.experimental import _config as shape_config

    return _traced_with(compiled, shape_config, "use_duck_shape", False)


def with_floats_as_constants(compiled: Callable) -> Callable:
    """`compiled`, traced with Python floats as constants. Under `dynamic=True` torch makes every float
    attribute of a module (each norm's eps, each dropout's p) a symbol, has to fix them all to their
    values while tracing, and then traces the whole model again ("Restarting analysis due to
    _tensorify_python_scalars" in its log): SDXL's cold first call took 325 s with the second trace
    and 218 s without it on an H200. ComfyUI calls a denoiser with no float that changes between
    calls (sigmas and strengths arrive as tensors). A patch that keeps a Python float and changes it
    recompiles for each new value; patches keep such values in tensors (as IP-Adapter packs do)."""
    import torch._dynamo.config as dynamo_config

    return _traced_with(compiled, dynamo_config, "specialize_float", True)


def _traced_with(compiled: Callable, config, setting: str, value) -> Callable:
    """`compiled`, called with torch's `config.setting` patched to `value`; `compiled` itself where
    this torch has no such setting."""
    if not hasattr(config, setting):
        return compiled

    def call(*args, **kwargs):
        with config.patch(**{setting: value}):  # read when a frame is traced, i.e. inside the call
            return compiled(*args, **kwargs)

    return call
