"""Which compile backends exist, by the name the user picks."""

from __future__ import annotations

from .base import Backend
from .errors import BackendUnavailable, ConfigError

_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def names() -> list[str]:
    return list(_BACKENDS)


def get(name: str) -> Backend:
    """The backend called `name`. Raises ConfigError for an unknown name."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(f"backend '{name}' is unknown: choose one of {', '.join(_BACKENDS)}") from None


def get_available(name: str) -> Backend:
    """Like `get`, but raises BackendUnavailable, with the reason, when it cannot run here."""
    backend = get(name)
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    return backend


def availability() -> dict[str, str | None]:
    """Each backend's name and why it cannot run here (None where it can)."""
    return {name: b.unavailable_reason() for name, b in _BACKENDS.items()}
