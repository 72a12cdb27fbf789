"""Compiling without inductor's and AOTAutograd's caches on disk: they outlive the test process, and a
graph found there is not lowered again (no layout decision is made, no new code is generated)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def without_compile_caches():
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
