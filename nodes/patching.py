"""Putting diffboost's denoiser into a ComfyUI model through the wrapper API.

What diffboost did to a model is one `BoostState` kept in the clone's model_options: the compile
options and the quantizer, in whatever order the nodes were chained. From it, one APPLY_MODEL
wrapper swaps the effective denoiser (quantized view, then compiled) in only while `apply_model`
runs and restores the original afterwards, so LoRA and other weight patches keep applying to the
real module names and other clones never see it. The shared module is never changed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import comfy.model_management
import comfy.utils
from comfy.patcher_extension import WrappersMP

from ..backends import CompileCache, CompiledModule, CompileOptions, compile_module
from ..quant import fp8_layers, release
from .conditioning import conditioning_on_device

WRAPPER_KEY = "diffboost"
STATE_KEY = "diffboost"  # model_options entry holding the BoostState of this clone
DENOISER = "diffusion_model"

# The FP8 layers (by id of their tuple, the same for a quantized stand-in and its compiled wrapper)
# that a model call is running right now, so that no FP8 weights are freed under it.
_RUNNING: Counter = Counter()
# Guards those counts and fp8_lifetime's record of who uses which FP8 weights: one lock, so that
# garbage collections on two threads cannot take two locks in opposite orders. Reentrant: a
# collection inside an update may run release_unless_running on the same thread.
FP8_LOCK = threading.RLock()


@dataclass(frozen=True)
class BoostState:
    compile_options: CompileOptions | None = None
    compile_label: str = "diffusion model"
    compile_node: str | None = None  # the Compile Model node's id, told when its model falls back to eager
    compile_cache: CompileCache | None = None
    # Builds a quantized stand-in for the denoiser (never changing its argument), and says what it did.
    quantizer: Callable | None = None
    quantization: str = ""
    denoiser: object = None  # the effective module swapped in: quantized view and/or CompiledModule
    compiled: CompiledModule | None = None

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the state is immutable and holds the
        # compiled denoiser, which clones must share, not copy.
        return self


def state_of(model) -> BoostState:
    return model.model_options.get(STATE_KEY) or BoostState()


def compiled_of(model) -> CompiledModule | None:
    """The CompiledModule diffboost attached to this model, or None."""
    return state_of(model).compiled


def with_boost(model, **changes) -> object:
    """A clone of `model` with its BoostState updated by `changes` and the denoiser rebuilt.

    Raises what the engine raises (ConfigError, BackendUnavailable, ...) before anything is attached,
    so a failing node leaves no half-applied state behind; `model` itself is never touched.
    """
    state = replace(state_of(model), **changes)
    original = model.get_model_object(DENOISER)
    denoiser = state.quantizer(original) if state.quantizer is not None else original
    compiled = None
    if state.compile_options is not None:
        compiled = compile_module(
            denoiser, state.compile_options, label=state.compile_label, cache=state.compile_cache,
            passthrough_errors=(comfy.model_management.InterruptProcessingException,))
        denoiser = compiled
    state = replace(state, denoiser=denoiser, compiled=compiled)
    m = model.clone()
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
    if denoiser is not original:
        after = None if compiled is None else report_problems(compiled, state.compile_node)
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               swap_in_while_applying({DENOISER: denoiser}, after))
        # A faster denoiser leaves the GPU idle on ComfyUI's per-step conditioning copies.
        m.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, conditioning_on_device)
    m.model_options[STATE_KEY] = state
    return m


def swap_in_while_applying(modules_by_key: dict, after: Callable[[], None] | None = None):
    """An APPLY_MODEL wrapper that puts `modules_by_key` (attribute path -> module) in place for
    the call and restores the originals afterwards, also when the call raises; then calls `after`."""

    running = [id(layers) for layers in map(fp8_layers, modules_by_key.values()) if layers]

    def wrapper(executor, *args, **kwargs):
        originals = {}
        with FP8_LOCK:
            _RUNNING.update(running)
        try:
            for key, module in modules_by_key.items():
                originals[key] = comfy.utils.get_attr(executor.class_obj, key)
                comfy.utils.set_attr(executor.class_obj, key, module)
            return executor(*args, **kwargs)
        finally:
            for key, module in originals.items():
                comfy.utils.set_attr(executor.class_obj, key, module)
            with FP8_LOCK:
                for key in running:
                    _RUNNING[key] -= 1
                    if _RUNNING[key] <= 0:
                        del _RUNNING[key]
            if after is not None:
                after()

    return wrapper


def release_unless_running(denoiser) -> None:
    """Free the FP8 weights of `denoiser` (rebuilt at its next call), unless a call is using them now:
    ComfyUI detaches every clone it deletes, and a clone may go while another one samples."""
    with FP8_LOCK:
        if not _RUNNING[id(fp8_layers(denoiser))]:
            release(denoiser)


def report_problems(compiled: CompiledModule, node_id: str | None) -> Callable[[], None]:
    """A callback that shows on the Compile Model node, once each, that its model fell back to eager or
    that CUDA graphs left regions out: the node's own text was written before the first sampling step,
    where the compile happens."""
    reported = set()

    def after_call() -> None:
        s = compiled.stats
        problems = {"failure"} if s.failure else set()
        problems |= {"cuda graph skips"} if s.cuda_graph_skips else set()
        if problems <= reported or node_id is None:
            return
        reported.update(problems)
        from server import PromptServer

        server = PromptServer.instance
        if server is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(describe_compiled(compiled), node_id)

    return after_call


def describe(model) -> str:
    """One line on what diffboost did to the model (compile and quantization state)."""
    state = state_of(model)
    parts = []
    if state.quantization:
        parts.append(f"FP8: {state.quantization}")
    if state.compiled is not None:
        parts.append(describe_compiled(state.compiled))
    return "; ".join(parts) or "eager (not compiled, not quantized)"


def describe_compiled(compiled: CompiledModule) -> str:
    s = compiled.stats
    text = f"compiled: {compiled.options.describe()}, {s.graphs_compiled} graph(s) compiled"
    if s.cache != "off":
        text += f", cache {s.cache}"
    if s.saved_graph:
        text += f", graph {s.saved_graph}"
    if s.failure:
        text += f", FELL BACK TO EAGER ({s.failure[:120]})"
    elif s.cuda_graph_skips:
        reasons = "; ".join(sorted(set(s.cuda_graph_skips)))
        text += (f", CUDA GRAPHS LEFT OUT {len(s.cuda_graph_skips)} REGION(S) ({reasons[:160]}): "
                 "they run kernel by kernel")
    return text
