"""Everything a compile needs to know, in one immutable object that prints, compares and hashes
(the compile cache is keyed by it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .modes import CompileMode, parse_mode

MEMORY_FORMATS = ("preserve", "channels_last")
DYNAMIC_CHOICES = ("auto", "on", "off")
ON_FAILURE = ("fall back to eager", "fail")


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: CompileMode = field(default_factory=CompileMode)
    memory_format: str = "preserve"
    dynamic: str = "auto"
    fuse_qkv: bool = False
    on_failure: str = "fall back to eager"

    @classmethod
    def from_user(cls, backend: str, mode: str, memory_format: str = "preserve", dynamic: str = "auto",
                  fuse_qkv: bool = False, on_failure: str = "fall back to eager") -> CompileOptions:
        """Check and build options from the node's widget values. Raises ConfigError."""
        for name, value, allowed in (("memory_format", memory_format, MEMORY_FORMATS),
                                     ("dynamic", dynamic, DYNAMIC_CHOICES),
                                     ("on_failure", on_failure, ON_FAILURE)):
            if value not in allowed:
                raise ConfigError(f"{name} '{value}' is not one of {', '.join(allowed)}")
        return cls(backend=backend, mode=parse_mode(mode), memory_format=memory_format, dynamic=dynamic,
                   fuse_qkv=bool(fuse_qkv), on_failure=on_failure)

    @property
    def dynamic_flag(self) -> bool | None:
        """torch.compile's `dynamic`: None lets torch decide (static first, dynamic after a change)."""
        return {"auto": None, "on": True, "off": False}[self.dynamic]

    @property
    def falls_back(self) -> bool:
        return self.on_failure == "fall back to eager"

    def describe(self) -> str:
        """One line for logs and the UI."""
        extra = [f"mode={self.mode.text}"]
        if self.memory_format != "preserve":
            extra.append(self.memory_format)
        if self.dynamic != "auto":
            extra.append(f"dynamic={self.dynamic}")
        if self.fuse_qkv:
            extra.append("fused qkv")
        return f"{self.backend} ({', '.join(extra)})"
