"""Counting the graphs torch.dynamo compiles for a prompt, and why it compiled them.

One recompile is the machine's, not the prompt's: ComfyUI's CPU attention (sub-quadratic) reads the
free memory at each call to size its chunks. The read is a graph break, and the frame that resumes
after it is first compiled with the number of free bytes as a constant, so the first call that finds
another number compiles that frame once more (with the number symbolic from then on). Whether that
happens in a given prompt depends on the machine's memory between two calls, so the counts below
leave it out, and say why they do.
"""

from __future__ import annotations

import linecache

from diffboost.measure.runner import dynamo_graph_count


def _where(code) -> str:
    return f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"


def guard_failures() -> dict:
    """Per compiled code object: the reasons its guards failed so far (torch.dynamo's record of recompiles)."""
    from torch._dynamo.utils import guard_failures as failures

    return {code: list(reasons) for code, reasons in failures.items()}


def why_recompiled(before: dict) -> list[tuple]:
    """(code object, reason) for each guard failure recorded since `before`."""
    return [(code, reason) for code, reasons in guard_failures().items()
            for reason in reasons[len(before.get(code, [])):]]


def recompiles(failures: list[tuple]) -> list[list[tuple]]:
    """Group guard failures into recompiles: for each, dynamo records newest first why each cached
    graph of the function was refused ("frame/entry: reason"), down to its first graph (entry 0)."""
    events, current = [], []
    for code, reason in failures:
        current.append((code, reason))
        if reason.split(":", 1)[0].endswith("/0"):
            events.append(current)
            current = []
    return events + ([current] if current else [])


def reads_free_memory(event: list[tuple]) -> bool:
    """Whether a recompile is the free-memory one: a frame resuming at ComfyUI's get_free_memory call,
    whose newest graph refused the call for the value that call returned (`___stack0`)."""
    code, reason = event[0]
    first_line = linecache.getline(code.co_filename, code.co_firstlineno)
    return (code.co_name.startswith("torch_dynamo_resume_in_") and "get_free_memory" in first_line
            and "___stack0" in reason.split("#", 1)[0])


class GraphCount:
    """Graphs dynamo compiles from its creation on, less the free-memory recompiles."""

    def __init__(self):
        self._graphs = dynamo_graph_count()
        self._failures = guard_failures()

    def _events(self) -> list[list[tuple]]:
        return recompiles(why_recompiled(self._failures))

    def for_free_memory(self) -> int:
        """Recompiles so far for the machine's free memory (see the module's docstring)."""
        return sum(reads_free_memory(e) for e in self._events())

    def new_graphs(self) -> int:
        """Graphs compiled so far for anything else: the prompt, the model, a new code path."""
        return max(0, dynamo_graph_count() - self._graphs - self.for_free_memory())

    def why(self) -> list[str]:
        """Why dynamo compiled again so far, free memory left out: for a failing test's message."""
        return [f"{_where(e[0][0])}: {e[0][1].splitlines()[0]}" for e in self._events() if not reads_free_memory(e)]
