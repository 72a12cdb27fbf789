"""What to quantize and how, as one immutable object: the FP8 type, which layers, and the checks
on what the user typed (type names, name patterns, the per-submodule JSON file)."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..backends.errors import ConfigError

# User-facing label -> short id used in code and in the JSON file.
QUANT_TYPES = {
    "fp8 e4m3 weights, dynamic per-row activation scales": "rowwise",
    "fp8 e4m3 per-tensor scales": "tensorwise",
    "fp8 weight-only": "weight_only",
}
LABELS = {short: label for label, short in QUANT_TYPES.items()}
SHORT_NAMES = {"rowwise": "W8A8 rowwise", "tensorwise": "W8A8 per-tensor", "weight_only": "weight-only"}
NEEDS_FP8_MATMUL = frozenset({"rowwise", "tensorwise"})  # these multiply in FP8; weight-only does not

# Measured on an H100 (benchmarks/RESULTS.md, compiled, whole models): FP8 pays on the DiTs' layers
# of 1536 features and more (SD3 1.13x, Flux 1.28x over bf16) and not on narrower ones (PixArt's
# 1152: 1.01x; the UNets' 320 - 1280: 0.83x - 0.87x per layer), down to 2M weights (SD3's 1536 x 1536).
DEFAULT_MIN_FEATURES = 1536
DEFAULT_MIN_WEIGHTS_MILLIONS = 2.0
# Layers that see one row per image (timestep, pooled-text and modulation projections), and layers
# that see only the text tokens (SD3's context blocks, Flux's txt stream, cross-attention keys and
# values): too few rows for FP8 to pay (SD3: 1.10x with its context blocks in FP8, 1.13x without),
# so they are kept by default. Per call on an H200 (benchmarks/fp8_floor.py), Flux's txt stream and
# modulation layers would gain 0.95x - 1.67x, 0.8 ms of a 126 ms step together: kept as well.
# Names from ComfyUI's UNet/DiT code.
DEFAULT_IGNORE = ("*adaLN_modulation*, *_mod.lin, *.modulation.lin, time_in.*, time_embed.*, time_text_embed.*, "
                  "t_embedder.*, t_block.*, label_emb.*, *.emb_layers.*, vector_in.*, guidance_in.*, y_embedder.*, "
                  "*.context_block.*, context_embedder, *.txt_*, txt_in, *.attn2.to_k, *.attn2.to_v, "
                  "*.cross_attn.kv_linear")
SETTING_KEYS = ("quant_type",)


def parse_quant_type(text: str, where: str = "quant_type") -> str:
    """The short id for a label or id the user gave ('rowwise', 'fp8 weight-only', ...). Raises ConfigError."""
    value = str(text).strip()
    normal = value.lower().replace("-", "_").replace(" ", "_")
    for short, label in LABELS.items():
        if value == label or normal in (short, label.lower().replace("-", "_").replace(" ", "_")):
            return short
    choices = ", ".join(f"'{label}' ('{short}')" for short, label in LABELS.items())
    raise ConfigError(f"{where} '{value}' is not a known FP8 quantization type; choose one of {choices}")


def parse_patterns(text: str, where: str = "ignore") -> tuple[str, ...]:
    """Module-name patterns separated by commas or new lines: fnmatch globs ('double_blocks.*.img_mlp.*')
    or regular expressions written 're:<regex>'. Raises ConfigError on a broken regex."""
    patterns = tuple(p.strip() for p in re.split(r"[,\n]", text or "") if p.strip())
    for p in patterns:
        check_pattern(p, where)
    return patterns


def check_pattern(pattern: str, where: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"{where}: pattern '{pattern}' is not a valid regular expression ({e})") from e


def name_matches(pattern: str, name: str) -> bool:
    """Whether `pattern` matches the qualified module name or one of its parents ('blocks.3' matches
    'blocks.3.attn.qkv'), so a pattern can name a whole block."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], candidate):
                return True
        elif fnmatch.fnmatchcase(candidate, pattern):
            return True
    return False


def load_submodule_settings(path: str | Path) -> tuple[tuple[str, str | None], ...]:
    """Read a per-submodule settings file: a JSON object mapping module-name patterns to false
    (keep in high precision), true or {} (quantize with the node's type), or {"quant_type": ...}.
    Returns (pattern, quant type id or "" for the node's type, or None to keep) in file order.
    Raises ConfigError naming the file and what is wrong in it."""
    path = Path(path)
    where = f"config file {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist (or is not a file); give the path of a JSON file, or leave "
                          "config_path empty")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} could not be read: {e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. Fix the file "
                          '(an object such as {"double_blocks.0.*": false}) or clear config_path') from e
    if not isinstance(data, dict):
        raise ConfigError(f'{where} must hold a JSON object such as {{"double_blocks.0.*": false, '
                          f'"single_blocks.*": {{"quant_type": "weight_only"}}}}, not a {type(data).__name__}')
    settings = []
    for pattern, value in data.items():
        entry = f"{where}, entry '{pattern}'"
        check_pattern(pattern, entry)
        if value is False:
            settings.append((pattern, None))
        elif value is True:
            settings.append((pattern, ""))
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(SETTING_KEYS))
            if unknown:
                raise ConfigError(f"{entry}: unknown setting(s) {', '.join(unknown)}; the known one is quant_type")
            settings.append((pattern, parse_quant_type(value["quant_type"], f"{entry}: quant_type")
                             if "quant_type" in value else ""))
        else:
            raise ConfigError(f'{entry}: the value must be false, true or {{"quant_type": ...}}, not {value!r}')
    return tuple(settings)


@dataclass(frozen=True)
class QuantConfig:
    """Which layers become FP8 and how. Build it with `from_user` to get the checks."""

    quant_type: str = "rowwise"
    min_features: int = DEFAULT_MIN_FEATURES  # both in and out features must be at least this
    min_weights: int = int(DEFAULT_MIN_WEIGHTS_MILLIONS * 1e6)  # and in x out at least this
    keep_first_last: bool = True
    ignore: tuple[str, ...] = ()
    submodules: tuple[tuple[str, str | None], ...] = ()  # from the JSON file; see load_submodule_settings
    allow_reference_path: bool = False  # run the slow dequantize-and-matmul path where FP8 matmuls are missing
    fuse_gelu: bool = True  # an FP8 layer takes over the tanh-GELU in front of it (see fuse_gelu.py)

    @classmethod
    def from_user(cls, quant_type: str, min_features: int = DEFAULT_MIN_FEATURES, keep_first_last: bool = True,
                  ignore: str = "", config_path: str | Path = "", allow_reference_path: bool = False,
                  min_weights_millions: float = DEFAULT_MIN_WEIGHTS_MILLIONS, fuse_gelu: bool = True) -> QuantConfig:
        """Check and build a config from the node's inputs. Raises ConfigError."""
        try:
            min_features = int(min_features)
            min_weights = int(float(min_weights_millions) * 1e6)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"min_features and min_weights_millions must be numbers, not {min_features!r} and "
                              f"{min_weights_millions!r}") from e
        if min_features < 16:
            raise ConfigError(f"min_features {min_features} is too small: FP8 matmuls need at least 16 features")
        if min_weights < 0:
            raise ConfigError(f"min_weights_millions {min_weights_millions} is negative: use 0 to turn it off")
        submodules = load_submodule_settings(config_path) if str(config_path).strip() else ()
        return cls(quant_type=parse_quant_type(quant_type), min_features=min_features, min_weights=min_weights,
                   keep_first_last=bool(keep_first_last), ignore=parse_patterns(ignore),
                   submodules=submodules, allow_reference_path=bool(allow_reference_path), fuse_gelu=bool(fuse_gelu))

    @property
    def label(self) -> str:
        return LABELS[self.quant_type]

    def setting_for(self, name: str) -> tuple[bool, str | None]:
        """The JSON file's decision for a layer: (False, None) when no entry matches, else (True, quant
        type id) or (True, None) to keep it. The last matching entry wins, as in a .gitignore."""
        decision: tuple[bool, str | None] = (False, None)
        for pattern, quant_type in self.submodules:
            if name_matches(pattern, name):
                decision = (True, None if quant_type is None else (quant_type or self.quant_type))
        return decision
