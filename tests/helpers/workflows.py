"""The bundled example workflows and what the tests need to run them.

- workflows/<name>.json: UI format (what ComfyUI's template browser lists and the user opens);
  workflows/api/<name>.json: the API-format twin, for headless runs (POST /prompt). ComfyUI lists
  only `workflows/*.json` as templates (app/custom_node_manager.py globs one level), so the
  twins in api/ are served but not listed.
- `ui_to_api`: the UI -> API conversion the frontend does on Queue, driven by node definitions
  (`/object_info` of a real server, or `node_defs` of the in-process host).
- `StandIns`: tiny random-weight files under the file names the workflows use, so the unchanged
  workflows validate and run on a CPU.
- `cpu_prompt`: the CPU-size overrides (64x64, 2 steps, one timed run) and, where the real text
  encoders are too big for a CPU, random conditioning in their place.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .tiny_models import _random  # the tiny checkpoints' seeded weights

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
API_DIR = WORKFLOWS / "api"
PACK_NAME = "diffboost"
IPADAPTER_PACK = "ComfyUI_IPAdapter_plus"

CLIP_G_TOO_BIG = ("SDXL's CLIP-G text encoder is built at full size (695M params) whatever the file holds: "
                  "13 s per prompt on a 2-core CPU")
T5_TOO_BIG = ("T5-XXL is built at full size (4.7B params, ~19 GB in fp32) whatever the file holds: it cannot "
              "run on a CPU test machine")


@dataclass(frozen=True)
class Scenario:
    name: str  # the file name, without .json
    arch: str  # the tiny stand-in's architecture (tests/helpers/tiny_models.py names)
    replace_text_encoders: str = ""  # why the CPU run swaps text encoding for random conditioning ("" = it runs)
    needs_pack: str = ""  # a third-party node pack the workflow needs (its usual custom_nodes folder name)
    cpu_size: int = 64  # image side for the CPU run


SCENARIOS = [
    Scenario("sd15_t2i_512", "sd15"),
    Scenario("sdxl_t2i_1024", "sdxl", CLIP_G_TOO_BIG),
    Scenario("sdxl_i2i_1024", "sdxl", CLIP_G_TOO_BIG),
    Scenario("sd15_instruct_pix2pix_512", "sd15", "the 8-channel stand-in checkpoint carries no CLIP-L (6 s saved)"),
    Scenario("sd3_medium_t2i_1024", "sd3", CLIP_G_TOO_BIG + " (SD3 also has CLIP-L and T5-XXL)"),
    # PixArt's position embedding divides by round(latent side / 64): 384 px is the smallest that runs.
    Scenario("pixart_alpha_t2i_1024", "pixart", T5_TOO_BIG, cpu_size=384),
    Scenario("flux_dev_t2i_1024", "flux", T5_TOO_BIG),
    Scenario("sdxl_controlnet_canny_1024", "sdxl", CLIP_G_TOO_BIG),
    Scenario("sdxl_ipadapter_1024", "sdxl", CLIP_G_TOO_BIG, needs_pack=IPADAPTER_PACK),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def ui_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api_workflow(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


# ------------------------------------------------------------------------------------- UI -> API

# UI-only nodes the frontend never sends to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Node modes in the UI format: 0 runs; 2 (muted) and 4 (bypassed) are left out of the prompt.
MUTED, BYPASSED = 2, 4

# cubiq/ComfyUI_IPAdapter_plus (IPAdapterPlus.py, commit 9d076a3): the inputs of the two nodes the
# IP-Adapter workflow uses, in /object_info form, for checking it where that pack is not installed.
IPADAPTER_PRESETS = ["LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
                     "PLUS (high strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)"]
THIRD_PARTY_NODE_DEFS = {
    "IPAdapterUnifiedLoader": {
        "input": {"required": {"model": ["MODEL"], "preset": [IPADAPTER_PRESETS]},
                  "optional": {"ipadapter": ["IPADAPTER"]}},
        "output": ["MODEL", "IPADAPTER"], "output_name": ["model", "ipadapter"], "output_is_list": [False, False],
        "name": "IPAdapterUnifiedLoader", "display_name": "IPAdapter Unified Loader", "category": "ipadapter",
        "description": "", "python_module": f"custom_nodes.{IPADAPTER_PACK}", "output_node": False},
    "IPAdapter": {
        "input": {"required": {"model": ["MODEL"], "ipadapter": ["IPADAPTER"], "image": ["IMAGE"],
                               "weight": ["FLOAT", {"default": 1.0, "min": -1, "max": 3, "step": 0.05}],
                               "start_at": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                               "end_at": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                               "weight_type": [["standard", "prompt is more important", "style transfer"]]},
                  "optional": {"attn_mask": ["MASK"]}},
        "output": ["MODEL"], "output_name": ["MODEL"], "output_is_list": [False],
        "name": "IPAdapter", "display_name": "IPAdapter", "category": "ipadapter",
        "description": "", "python_module": f"custom_nodes.{IPADAPTER_PACK}", "output_node": False},
}


def node_defs(nodes_module, class_types) -> dict:
    """/object_info-like definitions ({"input": {"required", "optional"}}) of `class_types`, from the
    in-process host's NODE_CLASS_MAPPINGS (V1 and V3 nodes both answer INPUT_TYPES()), falling back to
    THIRD_PARTY_NODE_DEFS for packs that are not installed."""
    defs = {}
    for class_type in class_types:
        cls = nodes_module.NODE_CLASS_MAPPINGS.get(class_type)
        if cls is not None:
            spec = cls.INPUT_TYPES()
            defs[class_type] = {"input": {k: dict(spec.get(k) or {}) for k in ("required", "optional")}}
        elif class_type in THIRD_PARTY_NODE_DEFS:
            defs[class_type] = THIRD_PARTY_NODE_DEFS[class_type]
    return defs


def _is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_widget_values(spec) -> int:
    """Widgets the frontend adds after an input's own: 'control after generate' (fixed/randomize) and
    the upload button of file inputs; both are saved in widgets_values but never sent to the server."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return int(bool(options.get("control_after_generate"))) + int(bool(options.get("image_upload")))


def ui_to_api(ui: dict, defs: dict) -> dict:
    """The API-format prompt the frontend would queue for UI-format workflow `ui` (no groups or
    subgraphs; reroute, primitive and bypassed nodes are not handled). Raises KeyError naming a
    node type `defs` lacks."""
    links = {link[0]: link for link in ui["links"]}  # id -> [id, from node, from slot, to node, to slot, type]
    prompt = {}
    for node in ui["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise NotImplementedError(f"node {node['id']} ({kind}) is bypassed: not handled by this converter")
        if kind not in defs:
            raise KeyError(f"node {node['id']}: no definition for node type {kind!r} (is its pack installed?)")
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        spec = defs[kind]["input"]
        for name, s in [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]:
            if _is_widget(s):
                value = values.pop(0) if values else None
                del values[:_extra_widget_values(s)]
                inputs[name] = value
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif name in inputs and inputs[name] is None:
                del inputs[name]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def same_graph(a: dict, b: dict) -> list[str]:
    """Differences between two API prompts in node types, links and widget values ([] when the same)."""
    diffs = []
    for node_id in sorted(set(a) | set(b), key=lambda k: (len(k), k)):
        if node_id not in a or node_id not in b:
            diffs.append(f"node {node_id} only in the {'first' if node_id in a else 'second'}")
            continue
        if a[node_id]["class_type"] != b[node_id]["class_type"]:
            diffs.append(f"node {node_id}: {a[node_id]['class_type']} != {b[node_id]['class_type']}")
        ia, ib = a[node_id]["inputs"], b[node_id]["inputs"]
        for name in sorted(set(ia) | set(ib)):
            if ia.get(name) != ib.get(name):
                where = f"node {node_id} ({a[node_id]['class_type']}).{name}"
                diffs.append(f"{where}: {ia.get(name)!r} != {ib.get(name)!r}")
    return diffs


# ------------------------------------------------------------------------------- stand-in models

# (models folder, file name the workflows use) -> what the stand-in holds.
STANDIN_FILES = {
    ("checkpoints", "v1-5-pruned-emaonly.safetensors"): "tiny SD1.5 UNet + full-size random CLIP-L + TAESD VAE",
    ("checkpoints", "sd_xl_base_1.0.safetensors"): "tiny SDXL UNet + TAESD VAE (no CLIP)",
    ("checkpoints", "instruct-pix2pix-00-22000.safetensors"): "tiny 8-channel SD1.5 UNet + TAESD VAE (no CLIP)",
    ("checkpoints", "sd3_medium_incl_clips_t5xxlfp16.safetensors"): "tiny MMDiT + 16-channel TAESD VAE (no CLIP)",
    ("diffusion_models", "PixArt-XL-2-1024-MS.pth"): "tiny PixArt-alpha DiT (a torch.save file, like the release)",
    ("diffusion_models", "flux1-dev.safetensors"): "tiny Flux-dev (one double block)",
    ("vae", "ae.safetensors"): "16-channel TAESD",
    ("vae", "vae-ft-mse-840000-ema-pruned.safetensors"): "4-channel TAESD",
    ("controlnet", "controlnet-canny-sdxl-1.0.safetensors"): "tiny SDXL ControlNet (ldm format)",
    ("text_encoders", "t5xxl_fp16.safetensors"): "placeholder: listed for validation, never loaded",
    ("text_encoders", "clip_l.safetensors"): "placeholder: listed for validation, never loaded",
}
STANDIN_FOLDERS = ("checkpoints", "diffusion_models", "vae", "controlnet", "text_encoders")
INPUT_IMAGE = "example.png"  # ships in ComfyUI/input; the image workflows load it


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _ip2p_unet_shapes(sd15_config: dict) -> dict:
    import comfy.supported_models
    import torch

    # Named, not detected: Stable Zero123 has the same config and is told apart only by its extra keys.
    model_config = comfy.supported_models.SD15_instructpix2pix(dict(sd15_config, in_channels=8))
    model_config.set_inference_dtype(torch.float32, None)
    return _shapes(model_config.get_model({}, "", device=torch.device("meta")).diffusion_model)


def _clip_l(seed: int) -> dict:
    """A CLIP-L text model of the real size (ComfyUI builds it from a fixed config) with random weights."""
    import comfy.clip_model
    import comfy.ops
    import torch

    config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    model = comfy.clip_model.CLIPTextModel(config, torch.float16, torch.device("meta"), comfy.ops.manual_cast)
    return {k: v for k, v in _random(_shapes(model), seed, torch.float16).items() if k.startswith("text_model.")}


def _sdxl_controlnet(tiny_models, seed: int) -> dict:
    import comfy.cldm.cldm
    import torch

    cfg = {k: v for k, v in tiny_models.SDXL.items() if k not in ("out_channels", "transformer_depth_output")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, device=torch.device("meta"), **cfg)
    return {f"control_model.{k}": v for k, v in _random(_shapes(net), seed, torch.float16).items()}


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


class StandIns:
    """Tiny stand-ins under the workflows' file names, in `root/<folder>/`. Files are made on first use;
    `tiny` is the harness' TinyModels (its files are reused where they fit)."""

    def __init__(self, root: Path, tiny):
        from . import tiny_models

        self.root = root
        self.tiny = tiny
        self.tm = tiny_models
        for folder in STANDIN_FOLDERS:
            (root / folder).mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        return self.root / name

    def ensure(self, scenario: Scenario) -> None:
        """Write every file `scenario`'s API workflow names (the ones STANDIN_FILES knows)."""
        wanted = set()
        for node in api_workflow(scenario.name).values():
            wanted.update(v for v in node["inputs"].values() if isinstance(v, str))
        for (folder, filename) in STANDIN_FILES:
            if filename in wanted:
                self.path(folder, filename)

    def path(self, folder: str, filename: str) -> Path:
        p = self.root / folder / filename
        if not p.exists():
            self._write(folder, filename, p)
        return p

    def _write(self, folder: str, filename: str, p: Path) -> None:
        import torch
        from safetensors.torch import save_file

        tm, tiny = self.tm, self.tiny
        if filename in ("sd_xl_base_1.0.safetensors", "flux1-dev.safetensors", "ae.safetensors",
                        "vae-ft-mse-840000-ema-pruned.safetensors"):
            source = {"sd_xl_base_1.0.safetensors": "sdxl", "flux1-dev.safetensors": "flux",
                      "ae.safetensors": "vae16", "vae-ft-mse-840000-ema-pruned.safetensors": "vae4"}[filename]
            p.symlink_to(tiny.path(source))  # the harness' file as it is
            return
        if filename == "PixArt-XL-2-1024-MS.pth":
            from safetensors.torch import load_file

            torch.save(load_file(str(tiny.path("pixart"))), str(p))
            return
        if filename == "v1-5-pruned-emaonly.safetensors":
            sd = tm.make_state_dict("sd15")
            sd.update(_prefixed(_clip_l(seed=11), "cond_stage_model.transformer."))
        elif filename == "instruct-pix2pix-00-22000.safetensors":
            # ComfyUI detects instruct-pix2pix from an SD1.5 UNet that takes 8 input channels.
            unet = _random(_ip2p_unet_shapes(tm.SD15), 12, torch.float16)
            sd = _prefixed(unet, "model.diffusion_model.")
            sd.update({k: v for k, v in tm.make_state_dict("sd15").items() if k.startswith("first_stage_model.")})
        elif filename == "sd3_medium_incl_clips_t5xxlfp16.safetensors":
            from safetensors.torch import load_file

            sd = _prefixed(load_file(str(tiny.path("sd3"))), "model.diffusion_model.")
            sd.update(_prefixed(load_file(str(tiny.path("vae16"))), "first_stage_model."))
        elif filename == "controlnet-canny-sdxl-1.0.safetensors":
            sd = _sdxl_controlnet(tm, seed=13)
        elif folder == "text_encoders":
            sd = {"placeholder": torch.zeros(1)}
        else:
            raise KeyError(f"no stand-in for {folder}/{filename}")
        tmp = p.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        tmp.rename(p)  # a server listing the folder never sees a half-written file

    def register(self, folder_paths, input_dir: Path) -> None:
        """Make the in-process host see the stand-ins, and the input image in its input folder."""
        for folder in STANDIN_FOLDERS:
            folder_paths.add_model_folder_path(folder, str(self.root / folder))
        put_input_image(input_dir)

    def extra_model_paths_yaml(self, path: Path) -> Path:
        """An extra_model_paths.yaml (for a server's --extra-model-paths-config) naming these folders."""
        lines = ["diffboost_workflow_standins:", f"    base_path: {self.root}"]
        lines += [f"    {f}: {f}/" for f in STANDIN_FOLDERS]
        path.write_text("\n".join(lines) + "\n")
        return path


def put_input_image(input_dir: Path) -> Path:
    """ComfyUI's own input/example.png (or a generated 64x64 PNG) in `input_dir`."""
    import folder_paths

    input_dir.mkdir(parents=True, exist_ok=True)
    target = input_dir / INPUT_IMAGE
    if not target.exists():
        shipped = Path(folder_paths.base_path) / "input" / INPUT_IMAGE
        if shipped.is_file():
            shutil.copyfile(shipped, target)
        else:
            from PIL import Image

            Image.new("RGB", (64, 64), (120, 160, 200)).save(target)
    return target


# ------------------------------------------------------------------------------------ CPU runs

TEXT_ENCODE_NODES = {"CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodePixArtAlpha"}
SIZE_NODES = {"EmptyLatentImage", "EmptySD3LatentImage", "ImageScale", "CLIPTextEncodePixArtAlpha"}


def cpu_prompt(scenario: Scenario, steps: int = 2) -> dict:
    """The scenario's API workflow at CPU size: scenario.cpu_size square images, `steps` steps, one warm-up and one
    timed run, FP8 through the reference path (a CPU has no FP8 matmul), and, where
    `replace_text_encoders` says why, seeded random conditioning in place of each text-encode node.
    Nodes that then feed nothing (the text encoder loaders) are dropped."""
    prompt = api_workflow(scenario.name)
    size = scenario.cpu_size
    seed = 0
    for node_id, node in sorted(prompt.items(), key=lambda kv: int(kv[0])):
        inputs = node["inputs"]
        if node["class_type"] in SIZE_NODES:
            inputs.update(width=size, height=size)
        if node["class_type"] == "DiffBoostBenchmarkSampler":
            inputs.update(steps=steps, warmup_runs=1, timed_runs=1)
        if node["class_type"] == "DiffBoostQuantizeFP8":
            inputs["allow_reference_path"] = True
        if scenario.replace_text_encoders and node["class_type"] in TEXT_ENCODE_NODES:
            seed += 1
            prompt[node_id] = {"class_type": "DiffBoostTest_RandomConditioning", "inputs": {
                "arch": scenario.arch, "seed": seed, "tokens": 0, "width": size, "height": size, "guidance": 3.5}}
    return _without_unused(prompt)


def _without_unused(prompt: dict) -> dict:
    used = {v[0] for node in prompt.values() for v in node["inputs"].values() if isinstance(v, list)}
    outputs = {"SaveImage"}
    keep = {k: n for k, n in prompt.items() if k in used or n["class_type"] in outputs}
    return keep if len(keep) == len(prompt) else _without_unused(keep)


def links_of(prompt: dict) -> set[tuple[str, str, str, int]]:
    """Every link of an API prompt as (to node, input name, from node, from slot)."""
    return {(node_id, name, v[0], v[1]) for node_id, node in prompt.items()
            for name, v in node["inputs"].items() if isinstance(v, list)}
