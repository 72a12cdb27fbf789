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


def open_cache(choice: str) -> CompileCache | None:
    if choice == "off":
        return None
    cache = CompileCache(cache_dir())
    if choice == "clear, then on":
        cache.clear()
    return cache
