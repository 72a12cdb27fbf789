"""Compile backends that fail on purpose, registered in the pack's own backend registry, so that
Compile Model (diffboost) can be given a failing compile through its real `backend` input:

- diffboost-test-broken: compile() itself raises (as onediff does when it cannot wrap a model).
- diffboost-test-crash: the compiled model raises on its first call (as inductor does on an op it
  cannot trace or lower).
- diffboost-test-slow: the first call "compiles" for SLOW_SECONDS in short sleeps, stopping at
  ComfyUI's interrupt as the sampler's step callback does, then runs the model uncompiled.

The backends are registered when this pack is imported after diffboost (the in-process harness loads
them in that order), and by the output node DiffBoostTest_RegisterBackends, which a test runs first
on a real server (where ComfyUI loads custom nodes in directory order).
"""

from __future__ import annotations

import importlib
import sys
import time

SLOW_SECONDS = 30.0
SLEEP_STEP = 0.05
FAILURE_TEXT = "injected compiler failure (diffboost test backend)"
PACK_NODE = "DiffBoostCompileModel"


class InjectedCompilerError(RuntimeError):
    """What the test backends raise: not a diffboost error, as a third-party compiler's would not be."""


class _TestBackend:
    """Duck-typed like diffboost.backends.base.Backend (the registry needs name, summary,
    unavailable_reason and compile)."""

    name = ""
    summary = "test only: fails on purpose"

    def unavailable_reason(self):
        return None


class BrokenBackend(_TestBackend):
    name = "diffboost-test-broken"

    def compile(self, module, options, on_graph):
        raise InjectedCompilerError(f"{FAILURE_TEXT}: cannot wrap {type(module).__name__}")


class CrashBackend(_TestBackend):
    name = "diffboost-test-crash"

    def compile(self, module, options, on_graph):
        def run(*args, **kwargs):
            on_graph()
            raise InjectedCompilerError(f"{FAILURE_TEXT}: cannot lower {type(module).__name__}")

        return run


class SlowBackend(_TestBackend):
    name = "diffboost-test-slow"

    def compile(self, module, options, on_graph):
        compiled = []

        def run(*args, **kwargs):
            if not compiled:
                on_graph()
                slow_compile()
                compiled.append(True)
            return module(*args, **kwargs)

        return run


def slow_compile(seconds: float = SLOW_SECONDS) -> None:
    import comfy.model_management

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        comfy.model_management.throw_exception_if_processing_interrupted()
        time.sleep(SLEEP_STEP)


BACKENDS = (BrokenBackend(), CrashBackend(), SlowBackend())


def pack_registry():
    """The backend registry of the diffboost pack ComfyUI loaded (a path-named module), or None
    while the pack is not loaded yet."""
    nodes = sys.modules.get("nodes")  # ComfyUI's; absent when this file is imported for its constants
    compile_node = None if nodes is None else nodes.NODE_CLASS_MAPPINGS.get(PACK_NODE)
    if compile_node is None:
        return None
    pack = compile_node.__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{pack}.backends.registry")


def register() -> list[str]:
    """Register the test backends in the loaded pack; the names registered (none before it loads)."""
    registry = pack_registry()
    if registry is None:
        return []
    for backend in BACKENDS:
        registry.register(backend)
    return [b.name for b in BACKENDS]


class RegisterBackends:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ()
    FUNCTION = "register"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/diffboost"

    def register(self):
        names = register()
        if not names:
            raise RuntimeError(f"the diffboost pack is not loaded: no {PACK_NODE} node")
        return {"ui": {"text": names}}


register()
