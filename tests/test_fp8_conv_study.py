"""The FP8 convolution studies compute convolutions: im2col with its weight matrix (benchmarks/fp8_floor.py)
and the implicit-GEMM Triton kernels (benchmarks/fp8_conv_study.py), on the CPU.

The kernels run under Triton's interpreter, in float32 so that any indexing mistake (a wrong tap offset,
a padded row stored, a channel block spilling into the next tap) shows as a large error instead of
hiding in FP8's rounding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_im2col_times_the_weight_matrix_is_the_convolution(kernel, stride, padding):
    from fp8_floor import conv_weight_matrix, im2col

    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 7).to(memory_format=torch.channels_last)
    w = torch.randn(16, 8, kernel, kernel)
    ref = F.conv2d(x, w, None, stride, padding)
    out = im2col(x, kernel, kernel, stride, padding) @ conv_weight_matrix(w).t()
    out = out.reshape(2, ref.shape[2], ref.shape[3], 16).permute(0, 3, 1, 2)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


KERNEL_CHECK = textwrap.dedent("""
    import json, sys, torch, triton, torch.nn.functional as F
    import fp8_conv_study as S
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    errors = {}
    # (B, C, H, W, O): a channel count that is not a multiple of the 32-channel block (48), a non-square image
    for b, c, h, w, o in [(2, 32, 6, 5, 48), (1, 48, 4, 4, 16)]:
        x, wt, bias = torch.randn(b, c, h, w), torch.randn(o, c, 3, 3), torch.randn(o)
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()
        wm = wt.permute(0, 2, 3, 1).reshape(o, -1).contiguous()
        ref = F.conv2d(x, wt, bias, 1, 1)
        for name, kernel in S.KERNELS.items():
            out = torch.full((b, o, h, w), float("nan")).to(memory_format=torch.channels_last)
            grid = (triton.cdiv(b * (h + 2) * (w + 2), 32), triton.cdiv(o, 32))
            kernel.fn[grid](xp, wm, torch.ones(1), torch.ones(o), bias, out, b * (h + 2) * (w + 2), c, o, h + 2,
                            w + 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
            errors[f"{name} {b}x{c}x{h}x{w}->{o}"] = float((out - ref).norm() / ref.norm())
    print(json.dumps(errors))
""")


def test_the_fp8_convolution_kernels_compute_the_convolution():
    pytest.importorskip("triton", reason="Triton (installed with torch on Linux) runs the kernels' interpreter")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(BENCHMARKS)}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 4  # both kernels, both shapes
    # NaN in any output position that should have been stored would make the error NaN and fail here
    assert all(err < 1e-5 for err in errors.values()), errors
