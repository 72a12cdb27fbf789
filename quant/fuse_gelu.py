"""Which tanh-GELUs of a model an FP8 layer can take over: the GELU whose output only feeds that
layer's input, so that the stand-in drops the GELU module and the layer applies it in one pass with
the activation's quantization (quant/kernels.py).

Three shapes qualify, each known from its forward:
- a GELU followed by the FP8 layer in an nn.Sequential (Flux's double-block MLPs);
- timm's Mlp (children fc1, act, drop1, norm, fc2, drop2, called in that order, drop1 and norm doing
  nothing), as SD3 and PixArt use it;
- Flux's single-stream block, whose `linear2` takes `cat(attention, mlp_act(mlp))`: the GELU applies to
  `linear2`'s input from `hidden_size` on.
"""

from __future__ import annotations

import torch

MLP_CHILDREN = ["fc1", "act", "drop1", "norm", "fc2", "drop2"]
SINGLE_STREAM_BLOCK = "SingleStreamBlock"  # ComfyUI's Flux (comfy/ldm/flux/layers.py)


def is_tanh_gelu(module) -> bool:
    return isinstance(module, torch.nn.GELU) and module.approximate == "tanh"


def _does_nothing(module) -> bool:
    return isinstance(module, torch.nn.Identity) or (isinstance(module, torch.nn.Dropout) and module.p == 0)


def gelu_handovers(root: torch.nn.Module, quantized: dict[str, str]) -> dict[str, tuple[str, int]]:
    """FP8 layer name -> (name of the GELU module it takes over, first input feature the GELU applies
    to), for the layers of `quantized` (qualified name -> quant type) that qualify."""
    handovers = {}
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        children = list(module._modules.items())
        if isinstance(module, torch.nn.Sequential):
            for (act_name, act), (layer_name, _) in zip(children, children[1:], strict=False):
                if is_tanh_gelu(act) and prefix + layer_name in quantized:
                    handovers[prefix + layer_name] = (prefix + act_name, 0)
        elif ([n for n, _ in children] == MLP_CHILDREN and is_tanh_gelu(module.act)
              and _does_nothing(module.drop1) and _does_nothing(module.norm) and prefix + "fc2" in quantized):
            handovers[prefix + "fc2"] = (prefix + "act", 0)
        elif (type(module).__name__ == SINGLE_STREAM_BLOCK and is_tanh_gelu(getattr(module, "mlp_act", None))
              and not getattr(module, "yak_mlp", False) and prefix + "linear2" in quantized
              and module.linear2.in_features == module.hidden_size + module.mlp_hidden_dim):
            handovers[prefix + "linear2"] = (prefix + "mlp_act", module.hidden_size)
    return handovers
