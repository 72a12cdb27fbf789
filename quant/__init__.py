"""Host-agnostic FP8 quantization: the config, FP8 numerics and Fp8Linear, layer selection and the
quantized stand-in for a model. Knows nothing of ComfyUI."""

from . import kernels  # noqa: F401 - registers the torch op diffboost::gelu_quantize_rows that Fp8Linear calls
from .config import DEFAULT_IGNORE, DEFAULT_MIN_FEATURES, DEFAULT_MIN_WEIGHTS_MILLIONS, LABELS, QUANT_TYPES, QuantConfig
from .device import Fp8Unavailable, choose_kernel, fp8_matmul_missing
from .fp8 import Fp8Linear, dequantize, quantize, quantize_weight
from .select import Selection, choose_layers
from .standin import fp8_layers, mark_stale, quantized_standin, refresh, release, shared_standin


class Fp8Quantizer:
    """The quantizer a BoostState holds: called with the original denoiser, returns its quantized
    stand-in (never changing the original), the same one for the same denoiser and config.
    Immutable and comparable, like the config it wraps."""

    def __init__(self, config: QuantConfig):
        self.config = config

    def __call__(self, original):
        return shared_standin(original, self.config)

    def __eq__(self, other):
        return isinstance(other, Fp8Quantizer) and other.config == self.config

    def __hash__(self):
        return hash(self.config)

    def __repr__(self):
        return f"Fp8Quantizer({self.config!r})"


__all__ = ["DEFAULT_IGNORE", "DEFAULT_MIN_FEATURES", "DEFAULT_MIN_WEIGHTS_MILLIONS", "LABELS", "QUANT_TYPES",
           "Fp8Linear", "Fp8Quantizer", "Fp8Unavailable", "QuantConfig", "Selection", "choose_kernel", "choose_layers",
           "dequantize", "fp8_layers", "fp8_matmul_missing", "mark_stale", "quantize", "quantize_weight",
           "quantized_standin", "refresh", "release"]
