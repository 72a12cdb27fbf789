"""CompiledModule: a compiled stand-in for a model's denoiser that compiles on its first call,
counts every (re)compile, and falls back to the original module when the backend fails."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .cache import CompileCache, cache_key, device_name
from .errors import CompileFailed
from .graph_skips import SkippedRegions
from .options import CompileOptions
from .runtime import runtime_switches
from .saved_graph import NOT_HANDLED

log = logging.getLogger("diffboost")


@dataclass
class CompileStats:
    """What a compiled model has done so far. Read it; only CompiledModule writes it."""

    graphs_compiled: int = 0
    calls: int = 0
    compile_seconds: float = 0.0  # wall time of the calls during which a graph was compiled
    first_call_seconds: float | None = None
    failure: str | None = None  # set once the backend failed and the model fell back to eager
    cache: str = "off"  # "off", "miss" (compiled from scratch) or "hit" (artifacts loaded from disk)
    saved_graph: str = ""  # "loaded" (ran without tracing) or "saved" (traced, saved for the next process)
    cuda_graph_skips: list[str] = field(default_factory=list)  # a reason per region CUDA graphs left out
    events: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"graphs_compiled": self.graphs_compiled, "calls": self.calls,
                "compile_seconds": round(self.compile_seconds, 3),
                "first_call_seconds": None if self.first_call_seconds is None else round(self.first_call_seconds, 3),
                "failure": self.failure, "cache": self.cache, "saved_graph": self.saved_graph,
                "cuda_graph_skips": list(self.cuda_graph_skips)}


class CompiledModule(torch.nn.Module):
    """Callable like `original`; runs the backend's compiled version of it.

    The original module is held, not registered as a child, so this object adds no parameters and
    changes nothing in the module that other model clones share. Unknown attributes (`dtype`, ...)
    are read from the original.
    """

    def __init__(self, original: torch.nn.Module, options: CompileOptions, backend,
                 label: str = "model", passthrough_errors: tuple[type[BaseException], ...] = (),
                 cache: CompileCache | None = None):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self.options = options
        self.label = label
        self.stats = CompileStats()
        self._passthrough = (torch.OutOfMemoryError, KeyboardInterrupt, *passthrough_errors)
        self._lock = threading.Lock()
        self._cache = cache
        self._cache_key: str | None = None
        self._backend = backend
        self._saved = None  # SavedGraphs, made at the first call when the cache is on
        try:
            # torch keeps every backend it was given until torch._dynamo.reset(): a strong callback would
            # keep this model and its graphs alive after ComfyUI freed it.
            compiled = backend.compile(original, options, _weak_call(self._count_graph))
        except self._passthrough:
            raise
        except Exception as e:  # a backend failing at once must honour on_failure too, not escape unexplained
            self._fall_back_or_raise(e)
            compiled = original
        # Held outside _modules too: a compiled nn.Module child would expose the original's parameters twice.
        object.__setattr__(self, "_compiled", compiled)

    @property
    def original(self) -> torch.nn.Module:
        return self._original

    def _count_graph(self) -> None:
        self.stats.graphs_compiled += 1

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        stats = self.stats
        if stats.failure is not None:
            return self._original(*args, **kwargs)
        if self.options.memory_format == "channels_last" and args and _is_image_batch(args[0]):
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        if self._cache is not None and self._cache_key is None:
            # Keyed at the first call, when the weights sit on the device the graphs are built for.
            self._cache_key = cache_key(self._original, self.options, device_name(self._original),
                                        self._cache.environment)
            stats.cache = "hit" if self._cache.load(self._cache_key) else "miss"
            self._saved = self._backend.saved_graphs(self._original, self.options, _weak_call(self._count_graph),
                                                     self._cache.root, self._cache_key)
        graphs_before = stats.graphs_compiled
        start = time.perf_counter()
        skipped = SkippedRegions() if self.options.mode.cudagraphs else None
        try:
            with self._lock, runtime_switches(self.options.mode), skipped or nullcontext():
                if self.options.mode.cudagraphs:
                    # A new sampling step: earlier CUDA-graph outputs may be overwritten from here on.
                    torch.compiler.cudagraph_mark_step_begin()
                out = NOT_HANDLED if self._saved is None else self._saved.call(args, kwargs)
                by_saved_graph = out is not NOT_HANDLED
                if not by_saved_graph:
                    if self.options.dynamic == "auto":
                        # Prompts differ in length (77, 154, ... tokens): static at one length, auto
                        # recompiles for the next. (A saved graph is for one length: its guards reject marks.)
                        _mark_token_dim_dynamic(kwargs.get("context"))
                    out = self._compiled(*args, **kwargs)
                if self.options.mode.cudagraphs and torch.is_tensor(out):
                    out = out.clone()  # the graph's output buffer is reused by the next replay
        except self._passthrough:
            raise
        except Exception as e:  # the backend failed: fall back or fail, as the user chose
            self._fall_back_or_raise(e)
            return self._original(*args, **kwargs)
        elapsed = time.perf_counter() - start
        if skipped is not None and skipped.count:
            self._note_skipped_regions(skipped)
        stats.calls += 1
        if stats.first_call_seconds is None:
            stats.first_call_seconds = elapsed
        if by_saved_graph and not stats.saved_graph:
            stats.saved_graph = "saved" if stats.graphs_compiled > graphs_before else "loaded"
            if stats.saved_graph == "loaded":
                stats.cache = "hit"
            stats.events.extend(self._saved.events)
        if stats.graphs_compiled > graphs_before:
            stats.compile_seconds += elapsed
            if self._cache is not None and not by_saved_graph:  # a saved graph is its own file
                self._save_to_cache()
        return out

    def _fall_back_or_raise(self, error: Exception) -> None:
        """Raise CompileFailed, or record the failure so that the original runs from now on, as the user chose."""
        reason = f"{type(error).__name__}: {error}".strip()
        if len(reason) > 600:
            reason = reason[:600] + " ..."
        if not self.options.falls_back:
            raise CompileFailed(
                f"{self.options.backend} could not compile or run the {self.label}: {reason}. "
                "Set on_failure to 'fall back to eager' to run without compilation, or choose "
                "another backend or mode.") from error
        self.stats.failure = reason
        self.stats.events.append(f"fell back to eager: {reason}")
        log.warning("diffboost: %s failed on the %s, running it uncompiled from now on: %s",
                    self.options.backend, self.label, reason)

    def _note_skipped_regions(self, skipped: SkippedRegions) -> None:
        # Inductor skips regions off a CUDA GPU without a log line. Buffers count: FP8 layers hold no parameters.
        on_cuda = any(t.is_cuda for t in itertools.chain(self._original.parameters(), self._original.buffers()))
        unlogged = "no reason logged" if on_cuda else "the model is not on a CUDA GPU"
        reasons = skipped.reasons + [unlogged] * (skipped.count - len(skipped.reasons))
        self.stats.cuda_graph_skips.extend(reasons)
        text = f"CUDA graphs left out {len(reasons)} compiled region(s), run kernel by kernel: {'; '.join(reasons)}"
        self.stats.events.append(text)
        log.warning("diffboost: %s: %s", self.label, text)

    def _save_to_cache(self) -> None:
        try:
            self._cache.save(self._cache_key)
        except OSError as e:  # a full or read-only disk must not fail the sampling
            log.warning("diffboost: could not write the compile cache in %s: %s", self._cache.root, e)


def _weak_call(method) -> Callable[[], None]:
    """Call `method` while its object lives; do nothing after."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


def _is_image_batch(x) -> bool:
    return torch.is_tensor(x) and x.dim() == 4


def _mark_token_dim_dynamic(context) -> None:
    """Compile the token dimension of text conditioning (batch, tokens, width) for any length; a
    hint only: torch keeps it static where the model needs one length."""
    if torch.is_tensor(context) and context.dim() == 3:
        torch._dynamo.maybe_mark_dynamic(context, 1)
