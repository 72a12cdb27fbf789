"""The looped GELU-and-quantize kernel of benchmarks/gelu_quantize_study.py computes what the pack's op
computes (quant/kernels.py's reference), run by Triton's interpreter on the CPU, on rows wider than a
chunk, narrower than one, and with the GELU from a column inside a chunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from gelu_quantize_study import looped_kernel
from diffboost.quant.kernels import reference
from diffboost.quant.fp8 import gelu_tail
kernel, out = looped_kernel(), []
for rows, cols, gelu_from, chunk in json.loads(sys.argv[1]):
    x = (3 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols))).to(torch.bfloat16)
    # float32 codes: what the kernel writes before the cast to e4m3, which the interpreter rounds wrongly
    scaled, scale = torch.empty(rows, cols), torch.empty(rows, 1)
    kernel[(rows,)](x, scaled, scale, cols, gelu_from, x.stride(0), scaled.stride(0), CHUNK=chunk)
    _, expected_scale = reference(x, gelu_from)
    expected = (gelu_tail(x, gelu_from) / expected_scale).clamp(-448, 448)
    out.append([float(((scale - expected_scale).abs() / expected_scale).max()),
                float((scaled - expected).abs().max()), float(scaled.abs().max())])
print(json.dumps(out))
"""


def test_the_looped_kernel_computes_the_reference_arithmetic_in_triton_s_interpreter():
    pytest.importorskip("triton", reason="!!! TRITON MISSING: the looped GELU kernel's test was SKIPPED !!!")
    cases = [(3, 100, 0, 32), (4, 80, 40, 32), (2, 20, 5, 32), (2, 96, 33, 16)]  # rows, cols, GELU from, chunk
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT.parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(cases), str(ROOT / "benchmarks")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for (scale_err, code_err, largest), case in zip(json.loads(done.stdout.splitlines()[-1]), cases, strict=True):
        assert scale_err < 1e-6, case
        assert code_err < 1e-3, case  # of codes up to 448: the same GELU, largest magnitude and scaling
        assert largest == pytest.approx(448, rel=1e-6), case  # each row's largest value lands on e4m3's largest
