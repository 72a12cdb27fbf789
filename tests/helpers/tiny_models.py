"""Tiny random-weight models of real architectures, as files ComfyUI's own loaders detect, plus
API-format graphs that sample them.

Each model keeps the sizes `comfy/model_detection.py` reads or `comfy/supported_models.py` matches
on and shrinks everything else (block counts, channel multipliers). Weights are seeded, so every
session writes identical files. ComfyUI must be importable (the host puts it on sys.path) because
the shapes come from instantiating ComfyUI's own modules on the meta device.

name             folder / file                                          loader
sd15             checkpoints/diffboost_tiny_sd15.safetensors            CheckpointLoaderSimple (CLIP out: None)
sdxl             checkpoints/diffboost_tiny_sdxl.safetensors            CheckpointLoaderSimple (CLIP out: None)
sd15, sdxl       diffusion_models/<same names> (symlinks, via ensure)   UNETLoader
sd3              diffusion_models/diffboost_tiny_sd3.safetensors        UNETLoader
pixart           diffusion_models/diffboost_tiny_pixart_alpha.safetensors  UNETLoader
flux             diffusion_models/diffboost_tiny_flux.safetensors       UNETLoader (404M params, bf16 file)
vae4             vae/diffboost_tiny_taesd.safetensors                   VAELoader (4-channel latents)
vae16            vae/diffboost_tiny_taesd16.safetensors                 VAELoader (16-channel: SD3, Flux)
sd15_lora        loras/diffboost_tiny_sd15_lora.safetensors             LoraLoader / LoraLoaderModelOnly
sd15_controlnet  controlnet/diffboost_tiny_sd15_controlnet.safetensors  ControlNetLoader
sdxl_controlnet  controlnet/diffboost_tiny_sdxl_controlnet.safetensors  ControlNetLoader

Every file is written on first use (TinyModels.path / .filename), seeded, so identical every session.

No CLIP text encoder is included: ComfyUI builds SD1.5's CLIP-L from a fixed config (123M params,
12 layers) whatever the file holds, so graphs use DiffBoostTest_RandomConditioning instead.
Flux cannot be small: detection hard-codes 24 heads of 128 (hidden 3072) and mlp_ratio 4, so one
double block (and no single block) is the minimum, ~404M params (bf16 file, 0.8 GB).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

_UNET_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
                "use_temporal_resblock": False}
# SD1.5 is matched on model_channels=320, context_dim=768, no adm: one level with one block is enough.
SD15 = dict(_UNET_COMMON, adm_in_channels=None, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
            transformer_depth_middle=-1, transformer_depth_output=[1, 1], use_linear_in_transformer=False,
            context_dim=768, num_heads=8)
# SDXL-family configs are matched on their exact input transformer_depth list; KOALA-700M's [0, 2, 5]
# (model_base.SDXL, supported_models.KOALA_700M, a subclass of SDXL) is the smallest. channel_mult is
# not matched, so every level stays 320 wide; output blocks carry no transformers.
SDXL = dict(_UNET_COMMON, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[1, 1, 1],
            channel_mult=[1, 1, 1], transformer_depth=[0, 2, 5], transformer_depth_middle=-1,
            transformer_depth_output=[0, 0, 0, 0, 0, 0], use_linear_in_transformer=True, context_dim=2048,
            num_head_channels=64)
# MMDiT: hidden = 64 * depth and heads = depth, read back from x_embedder; pos_embed 32x32 patches (512 px).
SD3 = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
       "adm_in_channels": 2048, "num_patches": 1024, "pos_embed_max_size": 32, "pos_embed_scaling_factor": None,
       "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
       "x_block_self_attn_layers": []}
# PixArt: hidden 1152 and 16 heads are hard-coded in detection; depth comes from the block count.
PIXART = {"image_model": "pixart_alpha", "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
          "depth": 1, "model_max_length": 120, "micro_condition": True}
FLUX = {"image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
        "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 3072,
        "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "depth": 1, "depth_single_blocks": 0,
        "guidance_embed": True, "yak_mlp": False, "txt_norm": False}

UNET_CONFIGS = {"sd15": SD15, "sdxl": SDXL, "sd3": SD3, "pixart": PIXART, "flux": FLUX}
# What each architecture must load as: (comfy.model_base class name, comfy.supported_models class name).
EXPECTED_CLASSES = {"sd15": ("BaseModel", "SD15"), "sdxl": ("SDXL", "KOALA_700M"), "sd3": ("SD3", "SD3"),
                    "pixart": ("PixArt", "PixArtAlpha"), "flux": ("Flux", "Flux")}
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "sd3": 16, "pixart": 4, "flux": 16}
DEFAULT_CFG = {"sd15": 7.0, "sdxl": 7.0, "sd3": 5.0, "pixart": 4.5, "flux": 1.0}
# PixArt computes its position-embedding scale as round(latent side / 64): below a 36x36 latent it is 0
# and the model divides by zero, so PixArt graphs sample 288x288 unless asked otherwise.
DEFAULT_SIZE = {"sd15": 64, "sdxl": 64, "sd3": 64, "pixart": 288, "flux": 64}

FILES = {  # name -> (model folder, file name)
    "sd15": ("checkpoints", "diffboost_tiny_sd15.safetensors"),
    "sdxl": ("checkpoints", "diffboost_tiny_sdxl.safetensors"),
    "sd3": ("diffusion_models", "diffboost_tiny_sd3.safetensors"),
    "pixart": ("diffusion_models", "diffboost_tiny_pixart_alpha.safetensors"),
    "flux": ("diffusion_models", "diffboost_tiny_flux.safetensors"),
    "vae4": ("vae", "diffboost_tiny_taesd.safetensors"),
    "vae16": ("vae", "diffboost_tiny_taesd16.safetensors"),
    "sd15_lora": ("loras", "diffboost_tiny_sd15_lora.safetensors"),
    "sd15_controlnet": ("controlnet", "diffboost_tiny_sd15_controlnet.safetensors"),
    "sdxl_controlnet": ("controlnet", "diffboost_tiny_sdxl_controlnet.safetensors"),
}
FOLDERS = ("checkpoints", "diffusion_models", "vae", "loras", "controlnet")
SEEDS = {name: i + 1 for i, name in enumerate(FILES)}
LORA_RANK = 4


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _random(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights that keep activations O(1): N(0, 1/fan_in) matrices, unit norm scales, zero biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) >= 2:
            t = torch.empty(shape).normal_(0.0, 1.0 / math.sqrt(math.prod(shape[1:])), generator=g)
        elif name.endswith(("weight", "scale", "vae_scale")):
            t = torch.ones(shape)
        else:
            t = torch.zeros(shape)
        out[name] = t.to(dtype)
    return out


def _diffusion_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[arch]))
    assert model_config is not None, f"ComfyUI matched no model config for tiny {arch}"
    model_config.set_inference_dtype(torch.float32, None)
    # device=meta, not a meta default device: some constructors call .item() on tensors they make.
    model = model_config.get_model({}, "", device=torch.device("meta"))
    return _meta_shapes(model.diffusion_model)


def _taesd_shapes(latent_channels: int) -> dict[str, tuple[int, ...]]:
    import comfy.taesd.taesd

    return _meta_shapes(comfy.taesd.taesd.TAESD(latent_channels=latent_channels))  # 2.4M params: CPU is fine


def make_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The tensors of tiny model `name` (a key of FILES)."""
    seed = SEEDS[name]
    if name in ("sd15", "sdxl"):  # a checkpoint: UNet + TAESD-format VAE (tiny, detected by its keys)
        sd = {f"model.diffusion_model.{k}": v for k, v in _random(_diffusion_shapes(name), seed, torch.float16).items()}
        vae = _random(_taesd_shapes(4), seed + 100, torch.float16)
        sd.update({f"first_stage_model.{k}": v for k, v in vae.items()})
        return sd
    if name in ("sd3", "pixart"):
        return _random(_diffusion_shapes(name), seed, torch.float16)
    if name == "flux":  # bf16 like the real release; ComfyUI computes in fp32 on a CPU
        return _random(_diffusion_shapes(name), seed, torch.bfloat16)
    if name in ("vae4", "vae16"):
        return _random(_taesd_shapes(4 if name == "vae4" else 16), seed, torch.float32)
    if name == "sd15_lora":
        return _sd15_lora(seed)
    if name in ("sd15_controlnet", "sdxl_controlnet"):
        return _controlnet(name.removesuffix("_controlnet"), seed)
    raise KeyError(name)


def _sd15_lora(seed: int) -> dict[str, torch.Tensor]:
    """Kohya-format LoRA (`lora_unet_<module path with _>.lora_up/.lora_down/.alpha`) on every
    attention q/k/v/out projection of the tiny SD1.5 UNet; up and down both nonzero."""
    shapes = _diffusion_shapes("sd15")
    targets = sorted(k for k in shapes if ".attn" in k and k.endswith(("to_q.weight", "to_k.weight",
                                                                      "to_v.weight", "to_out.0.weight")))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in targets:
        out_f, in_f = shapes[k]
        name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        sd[f"{name}.lora_down.weight"] = torch.randn(LORA_RANK, in_f, generator=g) / math.sqrt(in_f)
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, LORA_RANK, generator=g) / math.sqrt(LORA_RANK)
        sd[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))
    return sd


def _controlnet(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """An ldm-format ControlNet (`control_model.*`) with the tiny UNet's block layout (sd15 or sdxl)."""
    import comfy.cldm.cldm

    cfg = {k: v for k, v in UNET_CONFIGS[arch].items() if k not in ("out_channels", "transformer_depth_output")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, device=torch.device("meta"), **cfg)
    return {f"control_model.{k}": v for k, v in _random(_meta_shapes(net), seed, torch.float16).items()}


def write(name: str, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in make_state_dict(name).items()}, str(tmp))
    tmp.rename(path)  # a server listing the folder never sees a half-written file
    return path


@dataclass
class TinyModels:
    """The models folder (checkpoints/, diffusion_models/, vae/, loras/, controlnet/) of one session."""

    root: Path

    def path(self, name: str) -> Path:
        """The file of tiny model `name` (a key of FILES), written on first use."""
        folder, filename = FILES[name]
        p = self.root / folder / filename
        if not p.exists():
            write(name, p)
        return p

    def filename(self, name: str) -> str:
        """What a loader node's file input takes (the name inside its folder); writes the file if needed."""
        return self.path(name).name

    def ensure(self, names: Iterable[str] | None = None) -> TinyModels:
        """Create the folders and write the files `names` (each is otherwise written on first use)."""
        for folder in FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        for name in names or ():
            p = self.path(name)
            if name in ("sd15", "sdxl"):  # UNETLoader takes checkpoints too: strips model.diffusion_model.
                link = self.root / "diffusion_models" / p.name
                if not link.exists():
                    link.symlink_to(p)
        return self

    def folder_paths(self) -> dict[str, Path]:
        return {folder: self.root / folder for folder in FOLDERS}

    def extra_model_paths_yaml(self, path: Path) -> Path:
        """An extra_model_paths.yaml (for --extra-model-paths-config) naming these folders."""
        lines = ["diffboost_tiny:", f"    base_path: {self.root}"] + [f"    {f}: {f}/" for f in FOLDERS]
        path.write_text("\n".join(lines) + "\n")
        return path


# ---------------------------------------------------------------------------------------------- graphs

NODE_IDS = {"loader": "1", "positive": "2", "negative": "3", "latent": "4", "sampler": "5", "capture": "6",
            "vae_loader": "7", "decode": "8", "capture_image": "9", "lora": "20", "controlnet_loader": "21",
            "hint": "22", "controlnet_apply": "23"}
FIRST_INSERTED_ID = 10  # inserted MODEL-path nodes get "10", "11", ...

Insert = dict | Callable[[list], dict]


def graph(arch: str, models: TinyModels, *, insert: Insert | list[Insert] | None = None, steps: int = 2,
          width: int | None = None, height: int | None = None, batch_size: int = 1, seed: int = 0,
          cfg: float | None = None,
          sampler_name: str = "euler", scheduler: str = "simple", denoise: float = 1.0, key: str = "latent",
          decode: bool = True, loader: str | None = None, lora: float | None = None,
          controlnet: float | None = None, tokens: int = 0) -> dict:
    """An API-format prompt: loader -> [LoRA] -> inserted nodes -> KSampler -> CaptureLatent (key)
    [-> VAEDecode -> CaptureImage (key + "_image")]. Node ids are NODE_IDS.

    insert: a node dict {"class_type", "inputs"} whose "model" input is filled in, or a callable
    taking the upstream MODEL link (["id", 0]) and returning such a dict, or a list of them (chained
    in order, ids "10", "11", ...). The sampler takes MODEL from the last one (output 0).
    loader: "checkpoint" (sd15, sdxl default) or "unet" (UNETLoader, the DiTs' only choice).
    lora: a strength (SD1.5 only) to add LoraLoaderModelOnly. controlnet: a strength (SD1.5, SDXL) to add
    the architecture's ControlNet on an empty hint.
    """
    loader = loader or ("checkpoint" if arch in ("sd15", "sdxl") else "unet")
    width, height = width or DEFAULT_SIZE[arch], height or DEFAULT_SIZE[arch]
    ids = NODE_IDS
    p: dict = {}
    if loader == "checkpoint":
        p[ids["loader"]] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.filename(arch)}}
        vae_link = [ids["loader"], 2]
    else:
        models.ensure([arch])
        p[ids["loader"]] = {"class_type": "UNETLoader", "inputs": {"unet_name": models.filename(arch),
                                                                  "weight_dtype": "default"}}
        vae_name = models.filename("vae16" if LATENT_CHANNELS[arch] == 16 else "vae4")
        p[ids["vae_loader"]] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}}
        vae_link = [ids["vae_loader"], 0]
    model_link = [ids["loader"], 0]
    if lora is not None:
        p[ids["lora"]] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model_link, "lora_name": models.filename("sd15_lora"), "strength_model": lora}}
        model_link = [ids["lora"], 0]
    inserts = insert if isinstance(insert, list) else ([] if insert is None else [insert])
    for i, ins in enumerate(inserts):
        node = ins(model_link) if callable(ins) else {"class_type": ins["class_type"],
                                                       "inputs": dict(ins.get("inputs", {}), model=model_link)}
        node_id = str(FIRST_INSERTED_ID + i)
        p[node_id] = node
        model_link = [node_id, 0]
    for name, s in (("positive", seed + 1), ("negative", seed + 2)):
        p[ids[name]] = {"class_type": "DiffBoostTest_RandomConditioning", "inputs": {
            "arch": arch, "seed": s, "tokens": tokens, "width": width, "height": height, "guidance": 3.5}}
    positive, negative = [ids["positive"], 0], [ids["negative"], 0]
    if controlnet is not None:
        p[ids["controlnet_loader"]] = {"class_type": "ControlNetLoader", "inputs": {
            "control_net_name": models.filename(f"{arch}_controlnet")}}
        p[ids["hint"]] = {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                                 "color": 0x808080}}
        p[ids["controlnet_apply"]] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": positive, "negative": negative, "control_net": [ids["controlnet_loader"], 0],
            "image": [ids["hint"], 0], "strength": controlnet, "start_percent": 0.0, "end_percent": 1.0}}
        positive, negative = [ids["controlnet_apply"], 0], [ids["controlnet_apply"], 1]
    if LATENT_CHANNELS[arch] == 16:
        p[ids["latent"]] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height,
                                                                           "batch_size": batch_size}}
    else:
        p[ids["latent"]] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height,
                                                                        "batch_size": batch_size}}
    p[ids["sampler"]] = {"class_type": "KSampler", "inputs": {
        "model": model_link, "seed": seed, "steps": steps, "cfg": DEFAULT_CFG[arch] if cfg is None else cfg,
        "sampler_name": sampler_name, "scheduler": scheduler, "positive": positive, "negative": negative,
        "latent_image": [ids["latent"], 0], "denoise": denoise}}
    p[ids["capture"]] = {"class_type": "DiffBoostTest_CaptureLatent", "inputs": {
        "samples": [ids["sampler"], 0], "key": key}}
    if decode:
        p[ids["decode"]] = {"class_type": "VAEDecode", "inputs": {"samples": [ids["sampler"], 0], "vae": vae_link}}
        p[ids["capture_image"]] = {"class_type": "DiffBoostTest_CaptureImage", "inputs": {
            "images": [ids["decode"], 0], "key": f"{key}_image"}}
    return p
