"""The quantized stand-in for a model: a structural copy in which the chosen Linear layers are
Fp8Linear modules and every other module, parameter and buffer is the very object of the original.

Where an FP8 layer takes over the tanh-GELU in front of it (fuse_gelu.py), the stand-in has an
Identity in the GELU's place.

The original is never changed, so other clones that share it keep running in full precision. The
Fp8Linears read their source layers' current weights, so weight patches made on the original
(LoRA, applied by ComfyUI when it loads the model) are quantized at the next call.
"""

from __future__ import annotations

import weakref

import torch

from ..backends.standin import replace_submodules
from .config import QuantConfig
from .fp8 import Fp8Linear
from .select import Selection, choose_layers

_QUANTIZED_CLASSES: dict[type, type] = {}

# Per original model, the stand-in built for each config: quantizing the same model again (the
# node running anew after an upstream LoRA change) gives the same stand-in, so that the graphs compiled
# for it still apply. Weak keys: an entry goes with its model; a stand-in holds the original's layers
# and parameter dictionaries, never the original module itself.
_STANDINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_standin(root: torch.nn.Module, config: QuantConfig) -> torch.nn.Module:
    """quantized_standin(root, config), built once per (root, config) and then handed out again."""
    standin = _STANDINS.get(root, {}).get(config)
    if standin is None:
        standin = quantized_standin(root, config)
        if standin is not root:  # an entry holding its own key would never go
            _STANDINS.setdefault(root, {})[config] = standin
    return standin


def quantized_standin(root: torch.nn.Module, config: QuantConfig,
                      selection: Selection | None = None) -> torch.nn.Module:
    """A stand-in for `root` with the layers `selection` (default: choose_layers(root, config)) picks
    as Fp8Linear. Nothing is quantized yet: each call of the stand-in first brings the FP8 weights up
    to date on the input's device. Returns `root` itself when no layer is picked."""
    selection = selection or choose_layers(root, config)
    plan = selection.quantized
    if not plan:
        return root
    layers: list[Fp8Linear] = []
    handovers = {layer: start for layer, _, start in selection.gelu_handovers}
    taken_over = {act for _, act, _ in selection.gelu_handovers}

    def swap(name: str, module: torch.nn.Module) -> torch.nn.Module | None:
        if name in taken_over:
            return torch.nn.Identity()  # the FP8 layer after it applies this GELU
        if name not in plan:
            return None
        layer = Fp8Linear(module, plan[name], allow_reference_path=config.allow_reference_path)
        if name in handovers:
            layer.gelu_from = handovers[name]
        layers.append(layer)
        return layer

    twin = replace_submodules(root, swap)
    base = type(root)
    cls = _QUANTIZED_CLASSES.get(base)
    if cls is None:
        # A subclass, so that isinstance checks in model code still hold for the stand-in.
        cls = type(base.__name__, (base,), {"forward": _forward, "__deepcopy__": _keep_identity,
                                           "__module__": base.__module__, "_fp8_base": base})
        _QUANTIZED_CLASSES[base] = cls
    twin.__class__ = cls
    object.__setattr__(twin, "_fp8_layers", tuple(layers))  # not children: they already sit in the tree
    object.__setattr__(twin, "_fp8_selection", selection)
    return twin


def fp8_layers(module) -> tuple[Fp8Linear, ...]:
    """The Fp8Linears of a quantized stand-in (also through a CompiledModule's `.original`), else ()."""
    seen = set()
    while module is not None and id(module) not in seen:
        seen.add(id(module))
        layers = getattr(module, "__dict__", {}).get("_fp8_layers")
        if layers is not None:
            return layers
        module = getattr(module, "__dict__", {}).get("_original")
    return ()


@torch.compiler.disable
def refresh(layers, device=None) -> int:
    """Bring every layer's FP8 weights up to date on `device`; returns how many were quantized.
    Kept out of compiled graphs: it is Python bookkeeping that runs once per call of the model."""
    return sum(layer.refresh(device) for layer in layers)


def mark_stale(module) -> None:
    """Quantize every FP8 layer of `module` again at its next call (weights were changed in place)."""
    for layer in fp8_layers(module):
        layer.mark_stale()


def release(module) -> None:
    """Free the FP8 weights of `module`'s stand-in (rebuilt at its next call)."""
    for layer in fp8_layers(module):
        layer.release()


def _forward(self, *args, **kwargs):
    x = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
    refresh(self._fp8_layers, x.device if torch.is_tensor(x) else None)
    return self._fp8_base.forward(self, *args, **kwargs)


def _keep_identity(self, memo):
    return self  # ModelPatcher.clone deep-copies model_options: the stand-in must stay a view of the shared model
