"""Host-agnostic compile engine: backends behind one interface, the mode string, and the
compiled stand-in for a denoiser. Knows nothing of ComfyUI."""

from . import registry
from .cache import CompileCache
from .compiled import CompiledModule, CompileStats
from .errors import BackendUnavailable, CompileFailed, ConfigError, DiffBoostError
from .inductor import InductorBackend
from .modes import CompileMode, parse_mode
from .onediff import NEXFORT, ONEFLOW
from .options import CompileOptions

registry.register(InductorBackend())
registry.register(NEXFORT)
registry.register(ONEFLOW)


def compile_module(module, options: CompileOptions, label: str = "model",
                   passthrough_errors: tuple = (), cache: CompileCache | None = None) -> CompiledModule:
    """Compile `module` with the backend `options` names. Raises ConfigError or BackendUnavailable
    at once, before anything is built, when the backend is unknown or cannot run here (or a mode flag
    needs what is missing here)."""
    backend = registry.get_available(options.backend)
    if options.mode.flash_attn_4:
        from .flash_attention import unavailable_reason

        if reason := unavailable_reason():
            raise BackendUnavailable(f"mode '{options.mode.text}' asks for flash-attn-4, but {reason}; "
                                     "or drop 'flash-attn-4' from the mode")
    return CompiledModule(module, options, backend, label=label, passthrough_errors=passthrough_errors,
                          cache=cache)


__all__ = ["BackendUnavailable", "CompileCache", "CompileFailed", "CompileMode", "CompileOptions", "CompileStats",
           "CompiledModule", "ConfigError", "DiffBoostError", "compile_module", "parse_mode", "registry"]
