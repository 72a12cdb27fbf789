"""Where the compile cache lives inside ComfyUI, and the node choice that controls it."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..backends import CompileCache

CACHE_CHOICES = ("on", "off", "clear, then on")


def cache_dir() -> Path:
    """DIFFBOOST_CACHE_DIR, else ComfyUI's user directory /diffboost/compile-cache."""
    override = os.environ.get("DIFFBOOST_CACHE_DIR")
    return Path(override) if override else Path(folder_paths.get_user_directory()) / "diffboost" / "compile-cache"


def host_environment() -> str:
    """ComfyUI's version and the launch options that choose which functions a model calls (attention,
    precision, memory mode): a saved graph traced under other ones must not be reused."""
    import comfy.cli_args

    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "unknown"
    words = ("attention", "fp16", "bf16", "fp32", "fp64", "fp8", "vram", "cpu", "deterministic", "fast",
             "directml", "upcast", "cast", "cuda")
    chosen = {k: repr(v) for k, v in sorted(vars(comfy.cli_args.args).items()) if any(w in k for w in words)}
    return f"comfyui {version} {chosen}"


def open_cache(choice: str) -> CompileCache | None:
    if choice == "off":
        return None
    cache = CompileCache(cache_dir(), environment=host_environment())
    if choice == "clear, then on":
        cache.clear()
    return cache
