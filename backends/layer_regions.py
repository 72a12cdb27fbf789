"""`reuse-layers`: inside a whole-model compile, the attention and feed-forward layers of ComfyUI's
UNet transformer blocks (SD1.5, SDXL) are traced and compiled once per input layout, and that code
is called again for their other instances (torch's `nested_compile_region`). The step stays one
graph (one CUDA graph with `cudagraphs`), unlike `regional`, which compiles blocks on their own and
runs the code between them uncompiled.

Only the layers named in LAYERS: a region must trace without a graph break and return no views of
its inputs or of its other outputs (torch raises for either, and the whole compile fails), which is
known of these and not of layers in general (Flux's modulation returns views of one tensor). A call
that would not trace as a region runs inline, as without the flag: attention other than torch's
SDPA (ComfyUI's CPU attention asks for free memory at every call), an attention override, or a
Python value among the arguments (it would differ from layer to layer, one region for each)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch

from .errors import ConfigError
from .standin import replace_submodules, twin_calling

# The layers that become regions, and whether the layer takes ComfyUI's transformer_options (whose
# entries, such as the block index, differ from one layer to the next; of them the attention functions
# read only the override, ATTENTION_OVERRIDE).
LAYERS = {
    "comfy.ldm.modules.attention.CrossAttention": True,  # SD1.5, SDXL: self- and cross-attention
    "comfy.ldm.modules.attention.FeedForward": False,  # SD1.5, SDXL: GEGLU feed-forward
}
# Not the DiTs' MLPs: SD3's and PixArt's traces lost 3% of their graph with them, in the noise of the
# trace time (benchmarks/RESULTS.md); their attention is no layer but a function of the block.
ATTENTION_OVERRIDE = "optimized_attention_override"
# ComfyUI's attention functions that trace without a graph break.
TRACEABLE_ATTENTION = {"attention_pytorch"}
# Distinct input layouts per layer class that torch may keep (SDXL: two or three per class and
# resolution); past it torch raises and the compile fails. A ComfyUI process lives through many
# resolutions and models whose layers share the class (and so the region), hence far above torch's 8.
MAX_LAYOUTS = 1024


def supported() -> bool:
    return hasattr(torch.compiler, "nested_compile_region")


def with_layer_regions(root: torch.nn.Module, layers: dict[str, bool] | None = None) -> torch.nn.Module:
    """A stand-in tree of `root` whose layers of the classes in `layers` (LAYERS by default: qualified
    class name -> whether it takes transformer_options) call their forward as nested compile regions.
    `root` itself is not changed; returned as it is when it has no such layer."""
    layers = LAYERS if layers is None else layers
    if not supported():
        raise ConfigError(f"mode flag 'reuse-layers' needs torch.compiler.nested_compile_region, which torch "
                          f"{torch.__version__} lacks: drop the flag or update torch")

    def replace(name: str, module: torch.nn.Module):
        takes_options = layers.get(_qualified(type(module)))
        if takes_options is None:
            return None
        return twin_calling(module, _RegionCall(module, _region(type(module), takes_options), takes_options))

    return replace_submodules(root, replace)


class _RegionCall:
    """The forward of one layer's stand-in: its region when the call allows one, else the layer's own."""

    def __init__(self, module: torch.nn.Module, region: Callable, takes_options: bool):
        self.module, self.region, self.takes_options = module, region, takes_options

    def __call__(self, *args, **kwargs):
        cls, inputs = type(self.module), kwargs
        if self.takes_options:
            options = kwargs.get("transformer_options")
            if not isinstance(options, (dict, type(None))) or not _traceable_attention(cls, options or {}):
                return cls.forward(self.module, *args, **kwargs)
            inputs = {k: v for k, v in kwargs.items() if k != "transformer_options"}
        if not all(v is None or isinstance(v, torch.Tensor) for v in (*args, *inputs.values())):
            return cls.forward(self.module, *args, **kwargs)
        return self.region(self.module, *args, **inputs)


def _traceable_attention(cls: type, options: dict) -> bool:
    """Whether the layer's attention traces as one graph: ComfyUI's choice (the function the layer's
    module calls) is torch's SDPA, and no override replaces it with code not known here."""
    if ATTENTION_OVERRIDE in options:
        return False
    chosen = getattr(sys.modules.get(cls.__module__), "optimized_attention", None)
    return getattr(chosen, "__name__", "") in TRACEABLE_ATTENTION


# One region function per layer class for every compile of the process, made before tracing (dynamo
# cannot trace making one): torch reuses a region's code only for calls of the same function object,
# and a later compile of the same model (Compile Model run again) finds the earlier graphs only so.
_REGIONS: dict[type, Callable] = {}


def _region(cls: type, takes_options: bool) -> Callable:
    if cls not in _REGIONS:
        extra = {"transformer_options": {}} if takes_options else {}

        def layer(module, *args, **kwargs):
            return cls.forward(module, *args, **kwargs, **extra)

        options = {}
        if "max_reuse_entries" in inspect.signature(torch.compiler.nested_compile_region).parameters:
            options["max_reuse_entries"] = MAX_LAYOUTS
        _REGIONS[cls] = torch.compiler.nested_compile_region(layer, **options)
    return _REGIONS[cls]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
