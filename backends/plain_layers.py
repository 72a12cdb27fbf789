"""Plain stand-ins for a host's weight-casting layers.

ComfyUI builds its models from layers that decide on every call whether to cast or patch their
weights (`comfy_cast_weights`, `weight_function`, `bias_function`) and otherwise run the torch layer
they subclass. While a layer is in that plain state, its stand-in here runs the same torch layer
directly: the same parameters (shared, not copied), the same result, a shorter trace, fewer guards,
and a class defined at module scope, which torch can name in a saved compile (it cannot name a class
nested in another, as the host's are). A layer in any other state is left as it is.
"""

from __future__ import annotations

import copy

import torch


class PlainLinear(torch.nn.Linear):
    """torch.nn.Linear over a casting layer's own parameters."""


class PlainConv1d(torch.nn.Conv1d):
    """torch.nn.Conv1d over a casting layer's own parameters."""


class PlainConv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d over a casting layer's own parameters."""


class PlainConvTranspose1d(torch.nn.ConvTranspose1d):
    """torch.nn.ConvTranspose1d over a casting layer's own parameters."""


class PlainConvTranspose2d(torch.nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d over a casting layer's own parameters."""


class PlainGroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm over a casting layer's own parameters."""


class PlainLayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm over a casting layer's own parameters."""


# Conv3d is left out on purpose: the host's Conv3d replaces torch's convolution (a cuDNN workaround).
PLAIN = {torch.nn.Linear: PlainLinear, torch.nn.Conv1d: PlainConv1d, torch.nn.Conv2d: PlainConv2d,
         torch.nn.ConvTranspose1d: PlainConvTranspose1d, torch.nn.ConvTranspose2d: PlainConvTranspose2d,
         torch.nn.GroupNorm: PlainGroupNorm, torch.nn.LayerNorm: PlainLayerNorm}
# The host's casting layer families whose plain state is exactly the torch layer they subclass.
CASTING_FAMILIES = ("disable_weight_init.", "manual_cast.")


def is_plain(module: torch.nn.Module) -> bool:
    """Whether a casting layer would run its torch base class unchanged on its next call."""
    return not (getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))


def is_casting_layer(module: torch.nn.Module) -> bool:
    """Whether `module` is one of the host's casting layers (whatever its state)."""
    return not module._modules and type(module).__qualname__.startswith(CASTING_FAMILIES)


def plain_stand_in(module: torch.nn.Module) -> torch.nn.Module | None:
    """A plain stand-in for `module`, or None when it is not a casting layer in its plain state or
    has no plain torch equivalent here."""
    if not is_casting_layer(module) or not is_plain(module):
        return None
    cls = type(module)
    base = next((b for b in cls.__mro__[1:] if b in PLAIN), None)
    if base is None or cls.forward is base.forward:
        return None
    twin = copy.copy(module)  # shares _parameters and _buffers: patched weights stay visible
    twin.__class__ = PLAIN[base]
    return twin
