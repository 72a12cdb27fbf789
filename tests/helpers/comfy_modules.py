"""ComfyUI's own DiT modules, tiny and seeded, with inputs: for graph-pass and quantization tests that
run a model's forward directly (ComfyUI must be importable: use the `comfy_host` fixture)."""

from __future__ import annotations

import torch


def seeded(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with the tiny checkpoints' seeded weights (every parameter and buffer: ComfyUI's modules
    leave some uninitialised, such as SD3's position embedding)."""
    from helpers import tiny_models as T

    net.load_state_dict(T._random(T._meta_shapes(net), seed=0, dtype=torch.float32))
    return net.eval()


def comfy_flux(blocks: int = 1):
    """ComfyUI's Flux with `blocks` double and `blocks` single blocks, 256 wide."""
    from comfy.ldm.flux.model import Flux

    from helpers.tiny_models import FLUX

    config = {k: v for k, v in FLUX.items() if k != "image_model"}
    config.update(hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], context_in_dim=64, vec_in_dim=32,
                  depth=blocks, depth_single_blocks=blocks)
    net = seeded(Flux(**config, dtype=torch.float32, device="cpu", operations=_ops()))
    g = torch.Generator().manual_seed(1)
    kwargs = {"x": torch.randn(1, 16, 8, 8, generator=g), "timestep": torch.tensor([0.7]),
              "context": torch.randn(1, 8, 64, generator=g), "y": torch.randn(1, 32, generator=g),
              "guidance": torch.tensor([3.5])}
    return net, kwargs


def comfy_sd3():
    """ComfyUI's MMDiT as the tiny SD3 checkpoint's (2 joint blocks, 128 wide)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    from helpers.tiny_models import SD3

    net = seeded(OpenAISignatureMMDITWrapper(**SD3, dtype=torch.float32, device="cpu", operations=_ops()))
    g = torch.Generator().manual_seed(1)
    kwargs = {"x": torch.randn(2, 16, 8, 8, generator=g), "timesteps": torch.tensor([0.5, 0.5]),
              "context": torch.randn(2, 8, 4096, generator=g), "y": torch.randn(2, 2048, generator=g)}
    return net, kwargs


def _ops():
    import comfy.ops

    return comfy.ops.disable_weight_init
