"""onediff's backends, `nexfort` and `oneflow`, through `onediff.infer_compiler.compile`.

Both are optional: their wheels target old torch and Python releases (nexfort: torch 2.3-2.4,
Python <= 3.11; oneflow: 0.9.0, Python 3.10), so on most machines they are absent and the backend
says so, with what to pick instead, before anything is changed."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

import torch

from .base import Backend
from .options import CompileOptions


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


class OneDiffBackend(Backend):
    def __init__(self, name: str, package: str, built_for: str, summary: str):
        self.name = name
        self.package = package
        self.built_for = built_for
        self.summary = summary

    def unavailable_reason(self) -> str | None:
        missing = [p for p in ("onediff", self.package) if _missing(p)]
        if not missing:
            return None
        here = f"torch {torch.__version__.split('+')[0]}, Python {sys.version_info.major}.{sys.version_info.minor}"
        return (f"backend '{self.name}' needs the {' and '.join(missing)} package(s), which are not installed; "
                f"{self.package} is built for {self.built_for}, this ComfyUI runs {here}. "
                "Choose backend 'inductor' (same mode strings), or install a matching onediff.")

    def compile(self, module: torch.nn.Module, options: CompileOptions,
                on_graph: Callable[[], None]) -> Callable:
        from onediff.infer_compiler import compile as onediff_compile

        backend_options = {"mode": options.mode.text}
        if options.memory_format == "channels_last":
            backend_options["memory_format"] = "channels_last"
        if options.dynamic_flag is not None:
            backend_options["dynamic"] = options.dynamic_flag
        compiled = onediff_compile(module, backend=self.name, options=backend_options)
        on_graph()  # onediff reports no per-graph hook; count the one compile it makes
        return compiled


NEXFORT = OneDiffBackend("nexfort", "nexfort", "torch 2.3-2.4 and Python <= 3.11",
                         "onediff's nexfort compiler (torch.compile backend tuned for DiTs)")
ONEFLOW = OneDiffBackend("oneflow", "oneflow", "Python 3.10 (oneflow 0.9.0)",
                         "onediff's oneflow graph compiler")
