"""Test-only ComfyUI nodes, loaded by the harness (in process and in the real server), never by users.

- DiffBoostTest_RandomConditioning: seeded random CONDITIONING of the shapes an architecture's text
  encoders give, so DiT graphs need no multi-GB text encoder.
- DiffBoostTest_CaptureLatent / DiffBoostTest_CaptureImage: output nodes that keep the tensor in
  `CaptureLatent.STORE[key]` (read it through the class in nodes.NODE_CLASS_MAPPINGS: ComfyUI loads
  this file under a path-named module, so importing it again would give a second, empty STORE) and
  report shape/finite/mean/std in their ui dict (visible in /history of a real server too).
- DiffBoostTest_AttentionScalePatch: a cross-attention patch applied the way IP-Adapter packs apply
  theirs; DiffBoostTest_SdpaAttention: attention through torch SDPA, as on a GPU (attention_patch.py).
- DiffBoostTest_RegisterBackends: registers compile backends that fail on purpose in the pack's
  backend registry (failing_backends.py).
"""

from __future__ import annotations

import torch

from .attention_patch import AttentionScalePatch, SdpaAttention
from .failing_backends import RegisterBackends

ARCHES = ["sd15", "sdxl", "sd3", "pixart", "flux"]
# (context width, default token count, pooled width or None); token counts are what the real encoders
# give (SD3: CLIP-L/G 77 + T5 77) except Flux, whose 256 T5 tokens would dominate a tiny model's step.
SHAPES = {"sd15": (768, 77, None), "sdxl": (2048, 77, 1280), "sd3": (4096, 154, 2048),
          "pixart": (4096, 120, None), "flux": (4096, 16, 768)}


def random_conditioning(arch: str, seed: int, tokens: int = 0, width: int = 64, height: int = 64,
                        guidance: float = 3.5) -> list:
    """The CONDITIONING list ComfyUI's text-encode nodes would give for `arch`, with N(0, 1) values."""
    dim, default_tokens, pooled = SHAPES[arch]
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens or default_tokens, dim, generator=g)
    extra = {}
    if pooled is not None:
        extra["pooled_output"] = torch.randn(1, pooled, generator=g)
    if arch == "sdxl":  # the size conditioning CLIPTextEncodeSDXL adds
        extra.update(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
    elif arch == "pixart":  # micro-conditions, as CLIPTextEncodePixArtAlpha adds them
        extra.update(width=width, height=height)
    elif arch == "flux":
        extra["guidance"] = guidance
    return [[cond, extra]]


def _stats(t: torch.Tensor) -> dict:
    f = t.float()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "finite": bool(torch.isfinite(f).all()), "mean": float(f.mean()), "std": float(f.std())}


class RandomConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "arch": (ARCHES,),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "tokens": ("INT", {"default": 0, "min": 0, "max": 4096}),  # 0: the architecture's usual count
            "width": ("INT", {"default": 64, "min": 8, "max": 16384}),
            "height": ("INT", {"default": 64, "min": 8, "max": 16384}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/diffboost"

    def make(self, arch, seed, tokens, width, height, guidance):
        return (random_conditioning(arch, seed, tokens, width, height, guidance),)


class CaptureLatent:
    STORE: dict[str, torch.Tensor] = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": "latent"})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/diffboost"

    def capture(self, samples, key):
        t = samples["samples"].detach().cpu().clone()
        CaptureLatent.STORE[key] = t
        return {"ui": {"diffboost_test_capture": [dict(_stats(t), key=key)]}, "result": (samples,)}


class CaptureImage:
    STORE: dict[str, torch.Tensor] = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "key": ("STRING", {"default": "image"})}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/diffboost"

    def capture(self, images, key):
        t = images.detach().cpu().clone()
        CaptureImage.STORE[key] = t
        return {"ui": {"diffboost_test_capture": [dict(_stats(t), key=key)]}}


NODE_CLASS_MAPPINGS = {
    "DiffBoostTest_RandomConditioning": RandomConditioning,
    "DiffBoostTest_CaptureLatent": CaptureLatent,
    "DiffBoostTest_CaptureImage": CaptureImage,
    "DiffBoostTest_AttentionScalePatch": AttentionScalePatch,
    "DiffBoostTest_SdpaAttention": SdpaAttention,
    "DiffBoostTest_RegisterBackends": RegisterBackends,
}
