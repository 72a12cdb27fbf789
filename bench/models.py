"""Models for the bench, built in memory: random weights in the real architectures (speed does not
depend on the weight values), so a comparison runs with no download; or a user's checkpoint.

Each model comes with seeded random conditioning of the shapes its text encoders would give, so
no text encoder is needed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False}
SD15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False}
# SD1.5 is detected from model_channels=320 and context_dim=768 alone: one level, one block keeps it small.
TINY_SD15 = dict(SD15, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_middle=-1,
                 transformer_depth_output=[1, 1])
SD3 = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
       "adm_in_channels": 2048, "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
       "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
       "x_block_self_attn_layers": []}
FLUX = {"image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
        "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 3072,
        "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "depth": 19, "depth_single_blocks": 38,
        "guidance_embed": True}
# PixArt-alpha XL-2 1024-MS: 120 T5 tokens, resolution and aspect-ratio micro-conditions.
PIXART = {"image_model": "pixart_alpha", "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
          "depth": 28, "model_max_length": 120, "input_size": 128, "pe_interpolation": 2, "micro_condition": True}

# name -> (unet config, latent channels, cfg, default resolution on GPU / on CPU)
ARCHITECTURES = {
    "sdxl": (SDXL, 4, 7.0, 1024), "sd15": (SD15, 4, 7.0, 512), "tiny-sd15": (TINY_SD15, 4, 7.0, 128),
    "sd3": (SD3, 16, 5.0, 1024), "flux": (FLUX, 16, 1.0, 1024), "pixart": (PIXART, 4, 4.5, 1024),
}


@dataclass
class BenchModel:
    name: str
    patcher: object  # comfy.model_patcher.ModelPatcher
    positive: list  # CONDITIONING
    negative: list
    latent_channels: int
    cfg: float
    params: int
    description: str


def default_model(device: torch.device) -> str:
    """Full-size SDXL on a GPU; tiny SD1.5 elsewhere (a full model would take minutes per step)."""
    return "sdxl" if device.type == "cuda" else "tiny-sd15"


def default_resolution(name: str) -> int:
    return ARCHITECTURES[name][3] if name in ARCHITECTURES else 1024


def build(name: str, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0) -> BenchModel:
    """A random-weight model of architecture `name` (see ARCHITECTURES), every weight initialised."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    if name not in ARCHITECTURES:
        raise ValueError(f"model '{name}' is unknown: choose one of {', '.join(ARCHITECTURES)} or pass --ckpt PATH")
    config, channels, cfg, _ = ARCHITECTURES[name]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet_config = dict(config, dtype=dtype)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError(f"ComfyUI did not recognise the '{name}' configuration (model_detection changed?)")
    model_config.set_inference_dtype(dtype, None)
    with torch.device(device):
        model = model_config.get_model({}, "", device=device)
    _initialise(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    positive, negative = conditioning(name, seed=seed)
    return BenchModel(name, patcher, positive, negative, channels, cfg, params,
                      f"{name} ({type(model).__name__}, random weights, {params / 1e6:.1f}M params, {dtype})")


def load_checkpoint(path: str, seed: int = 0) -> BenchModel:
    """A user's checkpoint (full checkpoint or diffusion model alone), with random conditioning of
    the shapes its architecture expects."""
    import comfy.sd

    try:
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)
        patcher = out[0]
    except Exception:  # not a full checkpoint: try a diffusion model file alone
        patcher = comfy.sd.load_diffusion_model(path)
    if patcher is None:
        raise ValueError(f"--ckpt {path}: ComfyUI found no diffusion model in this file")
    name = architecture_of(patcher)
    channels = patcher.model.latent_format.latent_channels
    cfg = ARCHITECTURES.get(name, (None, None, 7.0, None))[2]
    positive, negative = conditioning(name, seed=seed)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    return BenchModel(name, patcher, positive, negative, channels, cfg, params,
                      f"{path} ({type(patcher.model).__name__}, {params / 1e6:.1f}M params)")


def architecture_of(patcher) -> str:
    kind = type(patcher.model).__name__.lower()
    for key, name in (("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux"), ("pixart", "pixart")):
        if key in kind:
            return name
    return "sd15"


def conditioning(name: str, seed: int = 0, res: int | None = None) -> tuple[list, list]:
    """Seeded random (positive, negative) CONDITIONING with the extra conds the architecture needs:
    SDXL pooled 1280 + size conds, SD3 pooled 2048, Flux pooled 768 + guidance, PixArt-alpha size conds."""
    g = torch.Generator().manual_seed(seed)

    def one():
        if name == "sdxl":
            size = res or 1024
            extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": size, "height": size,
                     "crop_w": 0, "crop_h": 0, "target_width": size, "target_height": size}
            return [[torch.randn(1, 77, 2048, generator=g), extra]]
        if name == "sd3":
            return [[torch.randn(1, 154, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
        if name == "flux":
            return [[torch.randn(1, 256, 4096, generator=g),
                     {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
        if name == "pixart":
            size = res or 1024
            return [[torch.randn(1, 120, 4096, generator=g), {"width": size, "height": size}]]
        return [[torch.randn(1, 77, 768, generator=g), {}]]  # sd15, tiny-sd15

    return one(), one()


def _initialise(module: torch.nn.Module, seed: int) -> None:
    # ComfyUI's ops skip weight initialisation (weights normally come from a file): fill every one,
    # on the weights' own device (full-size models on a CPU generator would take minutes).
    generators: dict = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                g = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("weight") or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()


def fp8_twin(patcher):
    """A separate model like `patcher`'s with ComfyUI's native FP8 (fp8_e4m3fn weights and
    fp8_optimizations, what weight_dtype fp8_e4m3fn_fast gives), holding the same weights cast to FP8.
    Only useful on a GPU with FP8 matmuls."""
    import comfy.model_detection
    import comfy.model_patcher

    base = patcher.model
    compute = base.get_dtype() if base.get_dtype() in (torch.float16, torch.bfloat16) else torch.bfloat16
    unet_config = dict(base.model_config.unet_config, dtype=torch.float8_e4m3fn)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError(f"ComfyUI cannot rebuild {type(base).__name__} with FP8 weights")
    model_config.set_inference_dtype(torch.float8_e4m3fn, compute)
    model_config.optimizations["fp8"] = True  # what model_options["fp8_optimizations"] sets at load time
    device = patcher.load_device
    with torch.device(device):
        model = model_config.get_model({}, "", device=device)
    weights = {k: v.to(device) for k, v in base.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(weights, strict=False)  # copy_ casts to each weight's FP8 dtype
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=patcher.offload_device)
