"""Putting a compiled denoiser into a ComfyUI model through the wrapper API: the compiled module
is swapped in only while `apply_model` runs, on a clone, so LoRA and other weight patches keep
applying to the real module names and other clones never see it."""

from __future__ import annotations

import comfy.utils
from comfy.patcher_extension import WrappersMP

COMPILE_KEY = "diffboost.compile"
STATE_KEY = "diffboost"  # model_options entry describing what diffboost did to this clone


def swap_in_while_applying(compiled_by_key: dict):
    """An APPLY_MODEL wrapper that puts `compiled_by_key` (attribute path -> module) in place for
    the call and restores the originals afterwards, also when the call raises."""

    def wrapper(executor, *args, **kwargs):
        originals = {}
        try:
            for key, module in compiled_by_key.items():
                originals[key] = comfy.utils.get_attr(executor.class_obj, key)
                comfy.utils.set_attr(executor.class_obj, key, module)
            return executor(*args, **kwargs)
        finally:
            for key, module in originals.items():
                comfy.utils.set_attr(executor.class_obj, key, module)

    return wrapper


def attach_compiled(model, compiled, key: str = "diffusion_model"):
    """Return a clone of `model` whose denoiser runs `compiled`. `model` itself is untouched."""
    m = model.clone()
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY, swap_in_while_applying({key: compiled}))
    state = dict(m.model_options.get(STATE_KEY, {}))
    state["compiled"] = compiled
    m.model_options[STATE_KEY] = state
    return m


def compiled_of(model):
    """The CompiledModule diffboost attached to this model, or None."""
    return model.model_options.get(STATE_KEY, {}).get("compiled")


def describe(model) -> str:
    """One line on what diffboost did to the model (compile and quantization state)."""
    state = model.model_options.get(STATE_KEY, {})
    parts = []
    if state.get("quantized"):
        parts.append(f"FP8: {state['quantized']}")
    compiled = state.get("compiled")
    if compiled is not None:
        s = compiled.stats
        text = f"compiled: {compiled.options.describe()}, {s.graphs_compiled} graph(s)"
        if s.failure:
            text += f", FELL BACK TO EAGER ({s.failure[:120]})"
        parts.append(text)
    return "; ".join(parts) or "eager (not compiled, not quantized)"
