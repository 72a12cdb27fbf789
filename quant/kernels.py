"""The activation's row-wise FP8 quantization with the tanh-GELU in front of it, in one pass.

Inductor quantizes a GELU's output in a looped reduction that reads the row and computes the GELU
twice (once for the row's largest magnitude, once to scale it), 2.3 - 3.3x the time of the GELU alone
on SD3's and Flux's MLPs (benchmarks/quantize_kernel_study.py). This kernel holds the row in
registers: one read of the bf16 input, one write of the e4m3 codes and the row's scale.

`gelu_quantize_rows(x, gelu_from)` is a torch custom op, so compiled graphs call it as one kernel and
CUDA graphs record it. On a CUDA device it runs the Triton kernel; elsewhere (the CPU, or without
Triton) the same arithmetic in torch.
"""

from __future__ import annotations

import functools

import torch

from .fp8 import E4M3, gelu_tail, quantize


def reference(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in torch: (e4m3 rows, float32 scales of shape (rows, 1))."""
    return quantize(gelu_tail(x, gelu_from), "row")


@functools.cache
def _kernel():
    """The Triton kernel, or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def gelu_quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, gelu_from, x_stride, q_stride,
                                  BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
        # 0.5 * (1 + tanh(u)) is sigmoid(2u): the tanh-GELU without a tanh. Constants as literals (Triton
        # reads no Python globals): sqrt(2 / pi), GELU's 0.044715, EPS and E4M3_MAX of fp8.py.
        gelu = x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
        y = tl.where(cols >= gelu_from, gelu, x)
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
        q = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
        tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=inside)
        tl.store(scale_ptr + row, scale)

    return gelu_quantize_rows_kernel


MAX_ROW = 32768  # a row the kernel holds in registers (Flux's widest is 15360); wider ones take the torch path


def _num_warps(block: int) -> int:
    # 8 warps up to rows of 16384: 9% faster than 16 on SD3's MLP rows and 5% on Flux's (H200,
    # benchmarks/gelu_quantize_study.py); the widest rows keep 16 so a thread holds at most 128 values.
    return 16 if block > 16384 else 8 if block >= 2048 else 4


def _define():
    """Define the op diffboost::gelu_quantize_rows; returns it."""

    @torch.library.custom_op("diffboost::gelu_quantize_rows", mutates_args=())
    def gelu_quantize_rows(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise e4m3 codes and float32 scales (rows, 1) of a 2-D `x` whose columns from
        `gelu_from` on first go through the tanh-GELU (0: all of them)."""
        kernel = _kernel() if x.is_cuda and x.shape[-1] <= MAX_ROW else None
        if kernel is None:
            return reference(x, gelu_from)
        x = x.contiguous()
        rows, cols = x.shape
        q = torch.empty((rows, cols), device=x.device, dtype=E4M3)
        scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
        if rows:
            import triton

            block = triton.next_power_of_2(cols)
            kernel[(rows,)](x, q, scale, cols, gelu_from, x.stride(0), q.stride(0), BLOCK=block,
                            num_warps=_num_warps(block))
        return q, scale

    @gelu_quantize_rows.register_fake
    def _(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)

    return gelu_quantize_rows


# Defined once per process: ComfyUI loads the pack as its own copy of these modules beside the
# installed package, and torch replaces an op defined again (its first registration goes away).
gelu_quantize_rows = (torch.ops.diffboost.gelu_quantize_rows if hasattr(torch.ops.diffboost, "gelu_quantize_rows")
                      else _define())
