"""Errors the engine raises. Each message says what was wrong and what to do."""


class DiffBoostError(Exception):
    """Base class of every error the pack raises on purpose."""


class ConfigError(DiffBoostError, ValueError):
    """A setting the user chose is malformed, unknown or contradicts another."""


class BackendUnavailable(DiffBoostError):
    """The chosen compile backend cannot run here (package missing or built for another torch)."""


class CompileFailed(DiffBoostError):
    """The backend raised while compiling or running the compiled model."""
