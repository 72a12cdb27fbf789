"""The interface every compile backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from .options import CompileOptions


class Backend(ABC):
    """A way to turn a torch module into a faster callable.

    `compile` may return at once and do the real work on the first call (torch.compile does);
    it calls `on_graph()` each time it builds a graph, which is how recompiles are counted.
    """

    name: str = ""
    summary: str = ""

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here; otherwise what is missing and what to choose instead."""
        return None

    @abstractmethod
    def compile(self, module: torch.nn.Module, options: CompileOptions,
                on_graph: Callable[[], None]) -> Callable:
        """Return a callable with the module's signature. Must not change `module`."""

    def saved_graphs(self, module: torch.nn.Module, options: CompileOptions, on_graph: Callable[[], None],
                     root, key: str):
        """A SavedGraphs running `module`'s calls from graphs saved under `root` (see saved_graph.py),
        or None where this backend or these options cannot save a whole compiled call."""
        return None
