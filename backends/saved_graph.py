"""Saved graphs: a compiled denoiser call kept on disk whole, so a new process skips dynamo's trace.

The compile cache (cache.py) brings back inductor's kernels, but a new process still traces the
model's Python again and builds its guards: 24.8 s of SDXL's 32.9 s first call on an H100. Here the
call is traced and compiled once ahead of time (torch's whole-graph `aot_compile_fullgraph`), saved
with its guards, and a new process loads it and runs it without tracing (SDXL: 9.9 s first call).

torch cannot save every guard it builds (identity and function guards are dropped), so a saved
graph is only used where diffboost checks what those guards covered:
- the model runs as a stand-in whose host casting layers are plain torch layers (plain_layers.py),
  and every one of them is still in its plain state at each call (low-VRAM casting or LoRA weight
  functions send the call to the usual compile);
- the source of every function traced is unchanged (a host update makes the file stale);
- the cache key holds the host's environment (its attention and precision settings), which decides
  what functions the model calls.
torch's saved guards still check the inputs (shapes, dtypes, devices), the module types and
constants, and the keys of `transformer_options` (an attention patch added later is rejected).
Anything these checks reject, and any failure to trace, save or load, runs the usual compile.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .cache import GRAPH_SUFFIX
from .plain_layers import is_casting_layer, is_plain, plain_stand_in
from .standin import replace_submodules

log = logging.getLogger("diffboost")

LOAD_TIMER = "diffboost.load_saved_graph"  # among torch's compile timers, read by measure/compile_phases.py
SAVE_TIMER = "diffboost.save_saved_graph"  # writing a new graph and loading it back, after its compile
NOT_HANDLED = object()  # what `SavedGraphs.call` returns when the usual compile must run the call
_LOADED: dict[str, object] = {}  # file name -> loaded function: every model of that layout in this process shares it
_UNSAVEABLE: set[str] = set()  # file names whose call could not be saved in this process: not tried again


def supported() -> bool:
    """Whether this torch can compile a call ahead of time and load it in another process, and
    saved graphs are not turned off (DIFFBOOST_SAVED_GRAPHS=0)."""
    if os.environ.get("DIFFBOOST_SAVED_GRAPHS", "1") == "0":
        return False
    try:
        from torch._dynamo.aot_compile import aot_compile_fullgraph  # noqa: F401
        from torch._dynamo.hooks import Hooks  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.compiler, "load_compiled_function")


def signature(value, depth: int = 0) -> str:
    """A short text of what a call's guards depend on: tensor shapes and dtypes, dictionary keys,
    sequence lengths, plain constants. It names the saved file; the guards decide."""
    if torch.is_tensor(value):
        return f"T{tuple(value.shape)}{str(value.dtype)[6:]}{value.device.type}"
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    if depth > 3:
        return type(value).__name__
    if isinstance(value, dict):
        from .inductor import VOLATILE_TRANSFORMER_OPTIONS

        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return "{" + ",".join(f"{k}:{signature(v, depth + 1)}" for k, v in items
                              if k not in VOLATILE_TRANSFORMER_OPTIONS) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(signature(v, depth + 1) for v in value) + "]"
    return type(value).__name__


def sources_unchanged(fn) -> bool:
    """Whether every function `fn` traced still has the source it had when it was traced."""
    module_lines: dict[str, list[str]] = {}  # a module's source, read once for all its traced functions
    for src in fn.source_info().inlined_sources:
        if src.module not in module_lines:
            try:
                module_lines[src.module] = inspect.getsourcelines(importlib.import_module(src.module))[0]
            except (ImportError, OSError, TypeError):
                return False
        text = "".join(module_lines[src.module][src.firstlineno - 1: src.lastlineno - 1])
        if hashlib.sha256(text.encode()).hexdigest() != src.checksum:
            return False
    return True


class SavedGraphs:
    """Runs a model's calls through saved graphs where it can (see the module's notes).

    `backend` is the inductor backend the usual compile uses (it counts graphs and applies diffboost's
    graph passes); `guard_filter` is that compile's guard filter; `root` is the cache folder and
    `key` the model's cache key. One graph is built per model and process, for its first call;
    graphs saved earlier load for any call they match.
    """

    def __init__(self, original: torch.nn.Module, backend, guard_filter: Callable, root: Path, key: str):
        self._original = original
        self._backend = backend
        self._settings = dict(getattr(backend, "config", {}))  # inductor settings of the compile
        self._guard_filter = guard_filter
        self._root = Path(root)
        self._key = key
        self._stand_in: torch.nn.Module | None = None
        self._layers: list[torch.nn.Module] = []  # the host layers the stand-in runs as plain ones
        self._graphs: dict[str, object] = {}  # signature digest -> loaded function, or None (none usable)
        self._built = False
        self._usable = True  # False when a casting layer had no plain stand-in at the first call
        self.events: list[str] = []

    def call(self, args: tuple, kwargs: dict):
        """The call's output through a saved graph, or NOT_HANDLED."""
        root = self._plain_root()
        if not self._usable or not self._stand_in_current():
            return NOT_HANDLED
        digest = hashlib.sha256(signature((args, kwargs)).encode()).hexdigest()[:16]
        if digest not in self._graphs:
            self._graphs[digest] = self._load(digest)
            if self._graphs[digest] is None and not self._built and self.path(digest).name not in _UNSAVEABLE:
                self._built = True
                self._graphs[digest] = self._build(digest, root, args, kwargs)
        fn = self._graphs[digest]
        if fn is None or not fn.guard_check(root, *args, **kwargs):
            return NOT_HANDLED
        return fn(root, *args, **kwargs)

    def path(self, digest: str) -> Path:
        return self._root / f"{self._key}-{digest}{GRAPH_SUFFIX}"

    def _plain_root(self) -> torch.nn.Module:
        if self._stand_in is None:
            layers, copies = [], []

            def replace(name, module):
                twin = plain_stand_in(module)
                if twin is not None:
                    layers.append(module)
                elif is_casting_layer(module):
                    self._usable = False  # cast per call (low VRAM) or patched: only the usual compile runs it
                return twin

            root = replace_submodules(self._original, replace, copies)
            if root is self._original:
                root = copy.copy(root)
                copies.append((self._original, root))
            if isinstance(root.__dict__.get("dtype"), torch.dtype):
                # torch's guard saver records an attribute no guard reads as missing, by its id; a dtype
                # is a singleton, so every saved tensor's dtype would load as missing. Models read their
                # dtype from parameters or inputs at call time; this attribute is for construction.
                del root.__dict__["dtype"]
            self._stand_in, self._layers = root, layers
            # What the stand-in copied and so would not see change: the root's attributes (an object
            # patch on the model's methods) and each container's children (a replaced block).
            self._root_attributes = dict(self._original.__dict__)
            self._children = [(original._modules, dict(original._modules)) for original, _ in copies]
            self._parameter_dicts = [m._parameters for m in root.modules()]  # shared with the original's modules
            params = self._parameters()
            self._parameter_specs = [_spec(p) for p in params]
            self._parameters_seen = [id(p) for p in params]
        return self._stand_in

    def _parameters(self) -> list:
        return [p for d in self._parameter_dicts for p in d.values()]

    def _parameters_as_traced(self) -> bool:
        """Whether every parameter has the dtype, device and shape it was traced with (checked again
        only when one was replaced: a LoRA, a model moved)."""
        params = self._parameters()
        ids = [id(p) for p in params]
        if ids == self._parameters_seen:
            return True
        if [_spec(p) for p in params] != self._parameter_specs:
            return False
        self._parameters_seen = ids
        return True

    def _stand_in_current(self) -> bool:
        """Whether the stand-in still runs what the original would: every casting layer plain, no
        attribute of the model and no child of a container replaced since the stand-in was made."""
        if self._original.__dict__ != self._root_attributes:
            return False
        return (all(live == seen for live, seen in self._children) and all(map(is_plain, self._layers))
                and self._parameters_as_traced())

    def _load(self, digest: str):
        path = self.path(digest)
        if path.name in _LOADED:
            return _LOADED[path.name]
        if not path.is_file():
            return None
        try:
            with _timed(LOAD_TIMER):
                fn = _deserialize(path.read_bytes(), self._settings)
            if not sources_unchanged(fn):
                raise ValueError("the model's code changed since it was saved")
        except Exception as e:  # stale, corrupt or from another torch: set aside, compile as usual
            path.replace(path.with_suffix(".broken"))
            self._note(f"saved graph {path.name} not used ({type(e).__name__}: {e}); moved aside")
            return None
        os.utime(path)  # recently used, for the cache's size cap
        _LOADED[path.name] = fn
        self.events.append(f"loaded saved graph {path.name}")
        return fn

    def _build(self, digest: str, root: torch.nn.Module, args: tuple, kwargs: dict):
        """Trace and compile this call ahead of time, save it, and load it back (the loaded function
        is the one a new process runs, so this process runs the same). None when torch cannot."""
        path = self.path(digest)
        try:
            fn = _compile_ahead(type(root).forward, ((root, *args), kwargs), self._backend, self._saveable_guards)
            with _timed(SAVE_TIMER):
                self._root.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                fn.save_compiled_function(str(tmp))
                tmp.replace(path)  # atomic: a reader never sees half a file
                data = path.read_bytes()
                fn = _deserialize(data, self._settings)
        except Exception as e:  # graph breaks, unsaveable guards, a full disk: the usual compile runs instead
            _UNSAVEABLE.add(path.name)
            self._note(f"the model's call could not be saved whole ({type(e).__name__}: {str(e)[:300]}); "
                       "it is compiled the usual way")
            return None
        _LOADED[path.name] = fn
        self.events.append(f"saved graph {path.name} ({len(data) / 2**20:.1f} MiB)")
        return fn

    def _saveable_guards(self, entries) -> list[bool]:
        """The usual compile's guard filter, less what torch cannot save (globals, identities); what
        those covered, diffboost checks itself (see the module's notes)."""
        from torch._dynamo.guards import CheckFunctionManager

        unsaveable = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
        keep = self._guard_filter(entries)
        return [k and not (e.is_global or e.guard_type in unsaveable or _parameter_tensor_guard(e))
                for k, e in zip(keep, entries, strict=True)]

    def _note(self, text: str) -> None:
        self.events.append(text)
        log.warning("diffboost: %s", text)


def _timed(name: str):
    """torch's compile timer under `name` (so reports of a first call include it), where torch has one."""
    try:
        from torch._dynamo.utils import dynamo_timed

        return dynamo_timed(name)
    except ImportError:
        import contextlib

        return contextlib.nullcontext()


def _spec(p) -> tuple | None:
    return None if p is None else (p.dtype, p.device, tuple(p.shape))


def _parameter_tensor_guard(entry) -> bool:
    """A guard on a parameter's tensor properties: dtype, device and shape, which SavedGraphs checks
    itself, and requires_grad, which differs between a loaded weight and one a LoRA replaced (the host
    makes those without gradients) and does not matter to a call without autograd."""
    return entry.guard_type == "TENSOR_MATCH" and "._parameters[" in entry.name


def _compile_ahead(function: Callable, example_inputs: tuple, backend, guard_filter: Callable):
    """torch's ahead-of-time whole-graph compile of `function` on `example_inputs` ((args, kwargs)),
    with diffboost's inductor backend as it is (torch.compile would wrap it in a generic backend,
    whose result torch cannot save)."""
    from torch._dynamo.aot_compile import aot_compile_fullgraph
    from torch._dynamo.hooks import Hooks

    extra = {}
    if "dynamic" in inspect.signature(aot_compile_fullgraph).parameters:
        extra["dynamic"] = backend.dynamic
    return aot_compile_fullgraph(function, example_inputs, hooks=Hooks(guard_filter_fn=guard_filter),
                                 backend=backend, **extra)


def _deserialize(data: bytes, settings: dict):
    # torch reads inductor's CUDA-graph setting when it rebuilds the compiled function, from the global
    # config: without the compile's own settings in place, a saved graph would run without CUDA graphs.
    with torch._inductor.config.patch(settings):
        fn = torch.compiler.load_compiled_function(io.BytesIO(data))
    fn.disable_guard_check()  # SavedGraphs.call checks the guards once, before calling
    return fn


