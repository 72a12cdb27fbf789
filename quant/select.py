"""Which Linear layers of a model become FP8, and why each other one is kept in high precision."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import SHORT_NAMES, QuantConfig, name_matches
from .fuse_gelu import gelu_handovers

QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Top-level names of the input embedding and output projection in ComfyUI's UNets and DiTs.
EDGE_NAMES = ("final_layer", "proj_out", "x_embedder", "img_in", "out", "norm_out", "conv_out", "pos_embed")

KEPT_SHAPE = "shape not a multiple of 16"
KEPT_DTYPE = "weights not fp16/bf16/fp32"
KEPT_CONFIG = "config file"
KEPT_IGNORE = "ignore list"
KEPT_EDGE = "first/last layer"
KEPT_SMALL = "small"
KEPT_FEW_WEIGHTS = "few weights"


@dataclass(frozen=True)
class LayerChoice:
    name: str
    in_features: int
    out_features: int
    quant_type: str | None  # None: kept in high precision
    reason: str = ""  # why kept (one of the KEPT_* labels)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Selection:
    """Every Linear layer of a model in registration order, each quantized or kept with a reason."""

    layers: tuple[LayerChoice, ...]
    min_features: int = 0
    min_weights: int = 0
    # (FP8 layer, the tanh-GELU module it takes over, first input feature the GELU applies to): fuse_gelu.py
    gelu_handovers: tuple[tuple[str, str, int], ...] = ()

    @property
    def quantized(self) -> dict[str, str]:
        """Qualified name -> quant type id of the layers to quantize."""
        return {c.name: c.quant_type for c in self.layers if c.quant_type is not None}

    @property
    def kept(self) -> list[LayerChoice]:
        return [c for c in self.layers if c.quant_type is None]

    @property
    def weight_share(self) -> float:
        """The quantized layers' share of all Linear weights; per token it is also their share of the
        Linear FLOPs (each weight is one multiply-add per token)."""
        total = sum(c.params for c in self.layers)
        return sum(c.params for c in self.layers if c.quant_type is not None) / total if total else 0.0

    def summary(self) -> str:
        """Short, for the model's one-line state: 'W8A8 rowwise, 140/176 Linear layers (93% of weights)'."""
        types = sorted({SHORT_NAMES[t] for t in self.quantized.values()})
        return (f"{' + '.join(types) or 'nothing'}, {len(self.quantized)}/{len(self.layers)} Linear layers "
                f"({self.weight_share:.0%} of weights)")

    def report(self, max_names: int = 6) -> str:
        """Several lines for the node's UI: what was quantized and each group of kept layers by reason."""
        lines = [f"Quantized {len(self.quantized)} of {len(self.layers)} Linear layers to FP8, holding "
                 f"{self.weight_share:.1%} of the Linear weights (and of their FLOPs per token)."]
        by_type: dict[str, int] = {}
        for t in self.quantized.values():
            by_type[t] = by_type.get(t, 0) + 1
        if len(by_type) > 1:
            lines.append("By type: " + ", ".join(f"{SHORT_NAMES[t]} {n}" for t, n in sorted(by_type.items())))
        if self.gelu_handovers:
            lines.append(f"{len(self.gelu_handovers)} of them compute the tanh-GELU in front of them together with "
                         "their activation's quantization, in one pass.")
        groups: dict[str, list[str]] = {}
        for c in self.kept:
            groups.setdefault(c.reason, []).append(c.name)
        for reason, names in groups.items():
            label = {KEPT_SMALL: f"smaller than {self.min_features} features",
                     KEPT_FEW_WEIGHTS: f"fewer than {self.min_weights / 1e6:g}M weights: FP8 would not pay"
                     }.get(reason, reason)
            shown = ", ".join(names[:max_names]) + (f", ... (+{len(names) - max_names})" if len(names) > max_names
                                                     else "")
            lines.append(f"Kept {len(names)} ({label}): {shown}")
        return "\n".join(lines)


def linear_layers(root: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(qualified name, module) of every nn.Linear (ComfyUI's ops subclass it) in registration order."""
    return [(name, m) for name, m in root.named_modules() if isinstance(m, torch.nn.Linear) and name]


def edge_layers(root: torch.nn.Module) -> set[str]:
    """The first and last module holding weights, in registration order: the input embedding and the
    output layer of most models (in a UNet both are convolutions, so no Linear is an edge)."""
    weighted = [name for name, m in root.named_modules() if name and m._parameters and not m._modules]
    return {weighted[0], weighted[-1]} if weighted else set()


def choose_layers(root: torch.nn.Module, config: QuantConfig) -> Selection:
    """Decide for each Linear layer of `root`. Hardware limits come first (shape, weight dtype); then
    the JSON file's entry if one matches; then the ignore list, the first/last layers and the sizes."""
    linears = linear_layers(root)
    edges = edge_layers(root)
    choices = []
    for name, m in linears:
        choices.append(LayerChoice(name, m.in_features, m.out_features, *_decide(name, m, config, edges)))
    selection = Selection(tuple(choices), config.min_features, config.min_weights)
    if not config.fuse_gelu:
        return selection
    handovers = gelu_handovers(root, selection.quantized)
    return replace(selection, gelu_handovers=tuple((layer, act, start) for layer, (act, start) in handovers.items()))


def _decide(name: str, m: torch.nn.Linear, config: QuantConfig, edges: set[str]) -> tuple[str | None, str]:
    if m.in_features % 16 or m.out_features % 16:
        return None, KEPT_SHAPE  # torch._scaled_mm needs both dimensions of the weight divisible by 16
    weight = m.weight
    if type(weight.data) is not torch.Tensor or weight.dtype not in QUANTIZABLE_DTYPES:
        return None, KEPT_DTYPE  # already low precision (ComfyUI fp8 or scaled checkpoints): leave it alone
    matched, quant_type = config.setting_for(name)
    if matched:
        return (quant_type, "") if quant_type is not None else (None, KEPT_CONFIG)
    if any(name_matches(p, name) for p in config.ignore):
        return None, KEPT_IGNORE
    if config.keep_first_last and (name in edges or name.split(".")[0] in EDGE_NAMES):
        return None, KEPT_EDGE
    if min(m.in_features, m.out_features) < config.min_features:
        return None, KEPT_SMALL
    if m.in_features * m.out_features < config.min_weights:
        return None, KEPT_FEW_WEIGHTS
    return config.quant_type, ""
