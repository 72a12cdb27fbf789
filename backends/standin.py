"""Stand-in module trees: a copy of a model in which some submodules are replaced, while every
other module, parameter and buffer is the very same object as in the original. The original is
never changed, so clones that share it keep working, and weight patches (LoRA) made on it are seen
through the stand-in, which shares its parameter dictionaries."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def replace_submodules(root: torch.nn.Module,
                       replace: Callable[[str, torch.nn.Module], torch.nn.Module | None],
                       copies: list | None = None) -> torch.nn.Module:
    """Return `root` with each submodule for which `replace(qualified_name, module)` returns a module
    swapped for that module. Containers on the way are shallow copies; nothing else is copied.
    `replace` is not asked about the children of a module it replaced. Returns `root` itself when
    nothing was replaced. Each (container, its copy) is appended to `copies` when given."""

    def visit(name: str, module: torch.nn.Module) -> torch.nn.Module:
        new_children = {}
        for child_name, child in module._modules.items():
            if child is None:
                continue
            qualified = f"{name}.{child_name}" if name else child_name
            swapped = replace(qualified, child)
            new_child = swapped if swapped is not None else visit(qualified, child)
            if new_child is not child:
                new_children[child_name] = new_child
        if not new_children:
            return module
        twin = copy.copy(module)  # shares _parameters and _buffers dicts: patched weights stay visible
        twin._modules = dict(module._modules)
        twin._modules.update(new_children)
        if copies is not None:
            copies.append((module, twin))
        return twin

    return visit("", root)


def repeated_blocks(root: torch.nn.Module, min_count: int = 2) -> set[type]:
    """Module classes that hold weights and occur at least `min_count` times, outermost first:
    the transformer and residual blocks a diffusion model is built from."""
    counts: dict[type, int] = {}
    for module in root.modules():
        if module is not root and module._modules and _holds_weights(module):
            counts[type(module)] = counts.get(type(module), 0) + 1
    containers = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)
    repeated = {cls for cls, n in counts.items() if n >= min_count and not issubclass(cls, containers)}
    # Drop classes that only ever appear inside another repeated class: compile the outer block.
    inner: set[type] = set()
    for module in root.modules():
        if type(module) in repeated:
            for sub in module.modules():
                if sub is not module and type(sub) in repeated:
                    inner.add(type(sub))
    return repeated - inner


def _holds_weights(module: torch.nn.Module) -> bool:
    # Registered buffer names count even while empty: a quantized stand-in's FP8 layers hold no
    # parameters and fill their weight buffers only at the first call.
    return any(m._parameters or m._buffers for m in module.modules())


_TWIN_CLASSES: dict[type, type] = {}


def twin_calling(module: torch.nn.Module, fn: Callable) -> torch.nn.Module:
    """A stand-in for `module` that is still an instance of its class (models dispatch on
    isinstance, e.g. `isinstance(layer, ResBlock)`) but whose forward calls `fn`. It shares the
    module's parameters, buffers and children."""
    cls = type(module)
    twin_cls = _TWIN_CLASSES.get(cls)
    if twin_cls is None:
        twin_cls = type(cls.__name__, (cls,), {"forward": _call_replacement, "__module__": cls.__module__})
        _TWIN_CLASSES[cls] = twin_cls
    twin = copy.copy(module)
    twin.__class__ = twin_cls
    object.__setattr__(twin, "_standin_forward", fn)  # kept out of _modules: not a child, no state_dict entry
    return twin


def _call_replacement(self, *args, **kwargs):
    return self._standin_forward(*args, **kwargs)
