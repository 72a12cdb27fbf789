"""FP8 e4m3 numerics and the Fp8Linear layer.

Scales are float32 and map each row's (or the tensor's) largest magnitude to 448, the largest
finite e4m3 value: q = clamp(x / scale, -448, 448) in e4m3, x ~= q * scale.
Weights are quantized once per weight version; activations on every call, written in plain
torch ops so that inductor fuses them into the kernel that produces the activation.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .device import choose_kernel

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
EPS = 1e-12  # keeps the scale of an all-zero row finite
ROWWISE_OUT_DTYPE = torch.bfloat16  # torch._scaled_mm's row-wise kernels write bf16 only
# Row-wise weights and activations for 'rowwise' and 'weight_only' (weights only); one scale per tensor otherwise.
GRANULARITY = {"rowwise": "row", "tensorwise": "tensor", "weight_only": "row"}


def quantize(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, float32 scale) of a 2-D tensor; the scale has shape (rows, 1) for 'row' and ()
    for 'tensor'."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True) if granularity == "row" else x.abs().amax()
    scale = amax.clamp(min=EPS) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def gelu_tail(x: torch.Tensor, gelu_from: int) -> torch.Tensor:
    """`x` in float32 with the tanh-GELU applied to its last dimension's entries from `gelu_from` on."""
    x = x.float()
    if gelu_from <= 0:
        return F.gelu(x, approximate="tanh")
    return torch.cat([x[..., :gelu_from], F.gelu(x[..., gelu_from:], approximate="tanh")], dim=-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def quantize_weight(weight: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight (out, in) as e4m3 with scales amax/448: per output channel (out, 1), or () for tensorwise."""
    return quantize(weight.detach(), GRANULARITY[quant_type])


class Fp8Linear(torch.nn.Module):
    """Stand-in for an nn.Linear (`source`) that multiplies with FP8 weights.

    It never changes `source`: it reads its weight and bias (after any `weight_function`s, ComfyUI's
    low-VRAM LoRA protocol) and quantizes them again whenever they change (a LoRA patched at model
    load replaces the weight tensor) or after `mark_stale()`. Run eagerly, `forward` checks this
    itself; inside torch.compile it cannot, so call `refresh(device)` outside the compiled region
    first (the quantized stand-in's root does).
    """

    def __init__(self, source: torch.nn.Linear, quant_type: str, allow_reference_path: bool = False):
        super().__init__()
        object.__setattr__(self, "_source", source)  # not a child: no second copy of its parameters
        self.in_features = source.in_features
        self.out_features = source.out_features
        self.quant_type = quant_type
        self.allow_reference_path = allow_reference_path
        self.kernel = ""  # 'scaled_mm', 'reference' or 'weight_only'; set by refresh
        # Set when the stand-in took over the tanh-GELU in front of this layer: applied to the input's
        # features from this one on (0: all), in one pass with the activation's quantization.
        self.gelu_from: int | None = None
        self.ready = False
        self._seen: tuple | None = None  # what the FP8 buffers were made from
        for name in ("weight_fp8", "weight_scale", "bias"):
            self.register_buffer(name, None, persistent=False)

    @property
    def source(self) -> torch.nn.Linear:
        return self._source

    @property
    def weight(self) -> torch.Tensor:
        """The source's (high-precision) weight, for model code that reads `layer.weight.dtype`."""
        return self._source.weight

    def extra_repr(self) -> str:
        gelu = "" if self.gelu_from is None else f", gelu_from={self.gelu_from}"
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_type={self.quant_type}{gelu}"

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options; a stand-in must keep viewing the shared source

    def mark_stale(self) -> None:
        """Quantize again at the next refresh (weights were changed in place, which refresh cannot see)."""
        self._seen = None

    def release(self) -> None:
        """Drop the FP8 copies (for example when the model leaves the GPU); the next refresh rebuilds them."""
        self.weight_fp8 = self.weight_scale = self.bias = None
        self._seen = None
        self.ready = False

    def refresh(self, device: torch.device | str | None = None) -> bool:
        """Make the FP8 weight match the source's current weight on `device` (default: where the source
        weight is). Returns whether it quantized. Raises Fp8Unavailable (see choose_kernel)."""
        src = self._source
        weight, bias = src.weight, src.bias
        weight_fns = tuple(getattr(src, "weight_function", None) or ())
        bias_fns = tuple(getattr(src, "bias_function", None) or ())
        device = torch.device(device) if device is not None else weight.device
        seen = (_identity(weight), _identity(bias), weight_fns, bias_fns, device)
        if self.ready and _same(seen, self._seen):
            return False
        self.kernel = choose_kernel(self.quant_type, device, self.allow_reference_path)
        with torch.no_grad():
            w = weight.detach().to(device)
            for fn in weight_fns:
                w = fn(w)
            q, scale = quantize_weight(w, self.quant_type)
            del w
            self._store("weight_fp8", q)
            self._store("weight_scale", scale)
            if bias is not None and (bias_fns or bias.device != device):
                b = bias.detach().to(device)
                for fn in bias_fns:
                    b = fn(b)
                self._store("bias", b)
            else:
                self._buffers["bias"] = bias  # shared with the source: no copy
        self._seen = seen
        self.ready = True
        return True

    def _store(self, name: str, value: torch.Tensor) -> None:
        old = self._buffers.get(name)
        reusable = (old is not None and old is not self._source.bias and old.shape == value.shape
                    and old.dtype == value.dtype and old.device == value.device
                    and (torch.is_inference_mode_enabled() or not old.is_inference()))
        if reusable:
            old.copy_(value)  # same address: CUDA graphs recorded on the old buffer stay valid
        else:
            self._buffers[name] = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # compiled graphs get refreshed layers from the stand-in's root
            self.refresh(x.device)
        rows = x.reshape(-1, self.in_features)
        if self.gelu_from is not None and self.kernel != "weight_only" and self.quant_type == "rowwise":
            xq, x_scale = torch.ops.diffboost.gelu_quantize_rows(rows, self.gelu_from)  # quant/kernels.py
        else:
            if self.gelu_from is not None:
                rows = gelu_tail(rows, self.gelu_from).to(x.dtype)
            if self.kernel == "weight_only":
                out = F.linear(rows, dequantize(self.weight_fp8, self.weight_scale, x.dtype), _cast(self.bias, x.dtype))
                return out.reshape(*x.shape[:-1], self.out_features)
            xq, x_scale = quantize(rows, GRANULARITY[self.quant_type])
        if self.kernel == "scaled_mm":
            out = self._scaled_mm(xq, x_scale, x.dtype)
        else:  # reference: the same quantized operands, multiplied in the compute dtype
            out = F.linear(dequantize(xq, x_scale, x.dtype), dequantize(self.weight_fp8, self.weight_scale, x.dtype),
                           _cast(self.bias, x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _scaled_mm(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.quant_type == "rowwise":
            out_dtype, w_scale = ROWWISE_OUT_DTYPE, self.weight_scale.reshape(1, -1)
        else:
            out_dtype, w_scale = dtype, self.weight_scale
        # cuBLAS takes a fused bias only in the output dtype, and not for float32 outputs.
        fuse_bias = self.bias is not None and out_dtype != torch.float32
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=w_scale,
                               bias=_cast(self.bias, out_dtype) if fuse_bias else None,
                               out_dtype=out_dtype, use_fast_accum=True)
        if self.bias is not None and not fuse_bias:
            out = out + self.bias.to(out_dtype)
        return out.to(dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _identity(t: torch.Tensor | None) -> tuple | None:
    """What tells one weight version from another without keeping it alive: a weak reference (the
    patcher swaps in a new tensor for a LoRA), the storage address (moved to another device) and
    the version counter (changed in place by torch ops)."""
    if t is None:
        return None
    version = 0 if t.is_inference() else t._version  # inference tensors have no version counter
    return (weakref.ref(t), t.data_ptr(), version, t.device, t.dtype)


def _same(a: tuple, b: tuple | None) -> bool:
    if b is None:
        return False
    for x, y in zip(a[:2], b[:2], strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and (x[0]() is None or x[0]() is not y[0]() or x[1:] != y[1:]):
            return False
    return a[2:] == b[2:]
