"""Boot ComfyUI inside this process, headless, for the bench CLI: no server, no browser.

ComfyUI is found through COMFYUI_PATH (default $HOME/ComfyUI), or as the ComfyUI whose
custom_nodes folder holds this pack."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
_booted = None


class ComfyNotFound(RuntimeError):
    pass


def comfy_path() -> Path:
    """Where ComfyUI is. Raises ComfyNotFound, saying how to point at it."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    else:
        candidates += [PACK_DIR.parent.parent, Path.home() / "ComfyUI"]
    for c in candidates:
        if (c / "comfy" / "model_detection.py").is_file():
            return c.resolve()
    raise ComfyNotFound(f"ComfyUI not found (looked in {', '.join(map(str, candidates))}): set COMFYUI_PATH to "
                        "the folder holding ComfyUI's main.py")


class RecordingServer:
    """Stands in for ComfyUI's PromptServer: keeps every message instead of sending it."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, object, object]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": text}, sid))

    def queue_updated(self):
        pass


class Host:
    """A booted in-process ComfyUI: its modules and the recording server."""

    def __init__(self, path: Path, server: RecordingServer, cpu: bool):
        import comfy.model_management
        import execution

        import nodes

        self.path = path
        self.server = server
        self.cpu = cpu
        self.nodes = nodes
        self.execution = execution
        self.mm = comfy.model_management

    @property
    def device(self):
        return self.mm.get_torch_device()

    def run_prompt(self, prompt: dict, prompt_id: str = "bench") -> dict:
        """Validate and execute an API-format prompt; returns {node_id: ui dict}. Raises on failure."""
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise RuntimeError(f"prompt is invalid: {valid[1]} {valid[3]}")
        executor = self.execution.PromptExecutor(self.server, cache_args={"lru": 0, "ram": 0.0})
        executor.execute(prompt, prompt_id, {}, valid[2])
        if not executor.success:
            errors = [d for e, d in executor.status_messages if e == "execution_error"]
            raise RuntimeError(f"prompt failed: {errors}")
        return {k: v.get("output", v) for k, v in executor.history_result.get("outputs", {}).items()}


def boot(cpu: bool | None = None, load_pack: bool = True, extras: bool = False, vram: str = "normal",
         sdpa_attention: bool = False) -> Host:
    """Import ComfyUI in this process (once) and load this pack's nodes. `cpu=None`: CPU when no CUDA.
    `vram`: "lowvram" or "novram" as ComfyUI's command-line flags of those names. `sdpa_attention`:
    ComfyUI's --use-pytorch-cross-attention (its CPU default splits attention in graph-breaking loops)."""
    global _booted
    if _booted is not None:
        return _booted
    path = comfy_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    import comfy.options

    comfy.options.enable_args_parsing(False)  # ComfyUI must not parse the bench's own command line
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu  # read when comfy.model_management is first imported
    comfy.cli_args.args.lowvram = vram == "lowvram"
    comfy.cli_args.args.novram = vram == "novram"
    comfy.cli_args.args.use_pytorch_cross_attention = sdpa_attention
    comfy.cli_args.args.disable_all_custom_nodes = False
    import comfy.model_management  # noqa: F401

    # Before `server`: otherwise `utils` resolves to comfy/utils.py (import_module keeps isort from reordering).
    importlib.import_module("utils.extra_config")
    import server

    recording = RecordingServer()
    server.PromptServer.instance = recording
    import nodes

    level = logging.getLogger().level
    if extras:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    else:  # the core nodes and the public API only: seconds faster than loading comfy_extras
        asyncio.run(nodes.init_public_apis())
    if load_pack:
        asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    logging.getLogger().setLevel(level)
    _booted = Host(path, recording, cpu)
    return _booted


def comfy_kitchen_version() -> str | None:
    """The version of comfy_kitchen the booted ComfyUI found, or None where it found none. ComfyUI's
    eager Flux (its RoPE) and native FP8 run its kernels, so a ratio to eager depends on it."""
    import comfy.quant_ops

    if getattr(comfy.quant_ops, "ck", None) is None:  # ComfyUI's own test: comfy/ldm/flux/math.py
        return None
    try:
        return importlib.metadata.version("comfy-kitchen")
    except importlib.metadata.PackageNotFoundError:  # importable, but not installed as a distribution
        return "(version unknown)"
