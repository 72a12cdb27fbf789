"""How engine errors reach the ComfyUI user: one message naming the node and what to do."""

from __future__ import annotations

from ..backends import DiffBoostError


class DiffBoostNodeError(RuntimeError):
    """Raised by a diffboost node; ComfyUI shows its message in the execution error."""


def node_error(where: str, error: DiffBoostError) -> DiffBoostNodeError:
    return DiffBoostNodeError(f"{where}: {error}")
