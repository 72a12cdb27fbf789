"""DiffBoostTest_AttentionScalePatch: an attention patch put on a model the way IP-Adapter packs do
(ModelPatcher.set_model_attn2_replace on a clone, one patch object per cross-attention block, its
weight kept as a torch tensor), for checking that a compiled model follows such patches."""

from __future__ import annotations

import torch


class ScaledCrossAttention:
    """Replaces cross-attention by (1 + scale) times itself. IP-Adapter adds weight * attention over
    image tokens; a scaled copy of the text attention changes the output the same way, with no weights."""

    def __init__(self, scale: float):
        self.scale = torch.tensor(scale)  # a tensor, as IP-Adapter packs keep theirs: a graph input, not a constant

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        # extra_options carries transformer_options: an optimized_attention_override there applies too.
        out = optimized_attention(q, k, v, extra_options["n_heads"], transformer_options=extra_options)
        return out * (1 + self.scale.to(out))


def cross_attention_blocks(unet) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every transformer block in a UNet, as
    set_model_attn2_replace names them."""
    levels = [("input", list(unet.input_blocks)), ("output", list(unet.output_blocks))]
    if getattr(unet, "middle_block", None) is not None:
        levels.append(("middle", [unet.middle_block]))
    found = []
    for name, blocks in levels:
        for number, block in enumerate(blocks):
            for layer in block:
                found += [(name, number, i) for i in range(len(getattr(layer, "transformer_blocks", ())))]
    return found


class AttentionScalePatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "scale": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing/diffboost"

    def patch(self, model, scale):
        m = model.clone()
        blocks = cross_attention_blocks(m.get_model_object("diffusion_model"))
        if not blocks:
            raise ValueError("the model has no UNet cross-attention blocks to patch")
        for block_name, number, index in blocks:
            m.set_model_attn2_replace(ScaledCrossAttention(scale), block_name, number, index)
        return (m,)


def sdpa_attention(func, *args, **kwargs):
    """An optimized_attention_override: torch's scaled_dot_product_attention whatever ComfyUI picked."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


class SdpaAttention:
    """Attention through torch SDPA, as ComfyUI uses on a GPU. On a CPU ComfyUI picks sub-quadratic
    attention, which asks for free memory on every call: a graph break per attention, where a GPU
    compiles the whole denoiser as one graph."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing/diffboost"

    def patch(self, model):
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sdpa_attention
        return (m,)
