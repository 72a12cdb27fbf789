"""The persistent compile cache: what torch compiled for a model, kept on disk so that the next
process reaching the same model and options skips most of the compile.

One file per key, holding torch's own cache artifacts (inductor's FX graphs and kernels, the
autotuning results, AOTAutograd's cache: `torch.compiler.save_cache_artifacts`). The key covers
everything that changes the compiled result: the model's class and parameter shapes and dtypes,
the compile options, the pack's own code, the torch, triton and Python versions and the device. A
file that cannot be loaded is set aside with a warning and rebuilt; the cache never stops a compile.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from .options import CompileOptions

log = logging.getLogger("diffboost")

DEFAULT_MAX_BYTES = int(float(os.environ.get("DIFFBOOST_CACHE_MAX_GB", "4")) * 2**30)
SUFFIX = ".torchcache"
GRAPH_SUFFIX = ".graph"  # saved graphs (saved_graph.py) share the folder, its cap and its clearing


def device_name(module: torch.nn.Module) -> str:
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cuda":
        return torch.cuda.get_device_name(p.device)
    if p is None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


# The pack's folders whose code shapes a compiled graph: the graph passes and backends, Quantize FP8's
# layers, and the nodes that patch the model.
CODE_FOLDERS = ("backends", "quant", "nodes")
PACK_ROOT = Path(__file__).resolve().parent.parent


def code_digest(root: Path = PACK_ROOT) -> str:
    """A digest of the pack's code under `root` that shapes compiled graphs: an updated pack (a graph pass
    rewriting differently, an op with new arguments) never loads what an older one compiled or saved."""
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache  # once per process: the files do not change under a running ComfyUI
def pack_code_digest() -> str:
    return code_digest()


def parameter_layout(module: torch.nn.Module) -> str:
    """A digest of `module`'s parameter names, shapes and dtypes (not their values)."""
    layout = hashlib.sha256()
    for name, p in module.named_parameters():
        layout.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return layout.hexdigest()


def one_group_per_kind(data: bytes) -> bytes:
    """torch's artifacts with one group per kind (inductor, AOTAutograd, ...), in torch's own format.

    Each `save_cache_artifacts()` appends a group per kind for what was compiled since the previous
    call, and `load_cache_artifacts()` reads the groups into a dict: only the last group of each kind
    survives. A model that compiles again after its first save (its second sampling step, a new
    resolution) would lose the earlier AOTAutograd entries, and the next process would trace them
    all again. Returned unchanged where this torch's private format is not the one known here."""
    try:
        from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache, _serialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer

        CacheArtifactManager._ensure_cache_artifacts_registered()
        merged: dict = {}
        for kind, artifacts in AppendingByteSerializer.to_list(data, deserialize_fn=_deserialize_single_cache):
            merged.setdefault(kind, []).extend(artifacts)
        out = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
        out.extend(merged.items())
        return out.to_bytes()
    except Exception as e:  # another torch: keep its bytes as they are (the last group of each kind loads)
        log.debug("diffboost: compile cache artifacts kept as torch wrote them (%s: %s)", type(e).__name__, e)
        return data


def cache_key(module: torch.nn.Module, options: CompileOptions, device: str, environment: str = "") -> str:
    """A stable name for what compiling `module` with `options` on `device` produces; `environment`
    is the host's own part (its settings that change which functions the model calls)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    parts = {
        "model": f"{type(module).__module__}.{type(module).__qualname__}",
        "parameters": parameter_layout(module),
        "options": repr(options),
        "code": pack_code_digest(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device": device,
        "environment": environment,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return f"{type(module).__name__}-{options.backend}-{digest}"


class CompileCache:
    """A folder of cache files with a size cap (least recently used go first)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, environment: str = ""):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.environment = environment  # the host's settings that change compiled results (cache_key)

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def load(self, key: str) -> bool:
        """Hot-load the artifacts stored under `key`. False when there are none or they are unusable."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            if torch.compiler.load_cache_artifacts(path.read_bytes()) is None:
                raise ValueError("torch could not read the artifacts (corrupt, or written by another version)")
        except Exception as e:  # a corrupt or stale file: set it aside and compile from scratch
            aside = path.with_suffix(".broken")
            path.replace(aside)
            log.warning("diffboost: compile cache entry %s could not be loaded (%s: %s); moved to %s and rebuilding",
                        path.name, type(e).__name__, e, aside.name)
            return False
        os.utime(path)  # mark as recently used for the size cap
        return True

    def save(self, key: str) -> int:
        """Store every artifact this process compiled so far under `key`. Returns bytes written."""
        saved = torch.compiler.save_cache_artifacts()
        if not saved:
            return 0
        data = one_group_per_kind(saved[0])
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(self.path(key))  # atomic: a reader never sees half a file
        self.prune()
        return len(data)

    def entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        files = [*self.root.glob(f"*{SUFFIX}"), *self.root.glob(f"*{GRAPH_SUFFIX}")]
        return sorted(files, key=lambda p: p.stat().st_mtime)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def prune(self) -> None:
        """Drop the least recently used entries until the folder fits the cap."""
        entries = self.entries()
        total = sum(p.stat().st_size for p in entries)
        for p in entries[:-1]:  # the newest entry always stays
            if total <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)

    def clear(self) -> int:
        """Delete every entry, saved graphs included, and set-aside broken ones. Returns how many
        files were removed."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for p in [*self.entries(), *self.root.glob("*.broken")]:
            p.unlink(missing_ok=True)
            removed += 1
        return removed


def main(argv: list[str] | None = None) -> int:
    """`python -m diffboost.backends.cache info|clear DIR`"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m diffboost.backends.cache",
                                 description="Inspect or clear diffboost's persistent compile cache.")
    ap.add_argument("action", choices=["info", "clear"])
    ap.add_argument("dir", help="the cache folder (ComfyUI/user/diffboost/compile-cache by default in ComfyUI)")
    a = ap.parse_args(argv)
    cache = CompileCache(a.dir)
    if a.action == "clear":
        print(f"removed {cache.clear()} file(s) from {cache.root}")
    else:
        for p in cache.entries():
            print(f"{p.stat().st_size / 2**20:9.1f} MiB  {time.ctime(p.stat().st_mtime)}  {p.name}")
        print(f"{cache.size() / 2**20:.1f} MiB in {cache.root} (cap {cache.max_bytes / 2**30:.1f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
