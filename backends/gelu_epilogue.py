"""gelu-epilogue: a tanh-GELU applied to a linear layer's output (the MLPs of SD3, PixArt and Flux's
double blocks) is computed by cuBLAS inside the matrix multiply, as its epilogue
(`torch._addmm_activation`), instead of by a separate kernel that reads the wide hidden activation
back and writes it again. Done on the captured graph, like fuse-rope, so the model, its clones and
ComfyUI stay as they are.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from .fuse import LINEAR

log = logging.getLogger("diffboost")

_GELU = (torch._C._nn.gelu, torch.nn.functional.gelu)
DEVICES = ("cuda",)  # where the pass rewrites: the GPU, where the GELU is cuBLASLt's epilogue


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(linear(x, weight, bias), approximate="tanh"), the GELU inside the matrix multiply on the GPU."""
    if not x.is_cuda:
        # The CPU's _addmm_activation applies the exact GELU, not the tanh one: compute it plainly.
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias), approximate="tanh")
    return matmul_with_gelu(x, weight, bias)


def matmul_with_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ + bias through one `_addmm_activation` with its GELU; on CUDA that GELU is cuBLASLt's
    epilogue, the tanh approximation (aten's own decomposition says so), elsewhere the exact GELU."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def _is_tanh_gelu(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _GELU or len(node.args) != 1:
        return False
    return node.kwargs == {"approximate": "tanh"}


def _fits(linear: torch.fx.Node, devices: tuple[str, ...]) -> bool:
    """A linear layer with a bias (the epilogue adds it) whose only user is the GELU, with half-precision
    inputs on one of `devices`."""
    if linear.op != "call_function" or linear.target not in LINEAR or linear.kwargs or len(linear.args) != 3:
        return False
    if len(linear.users) != 1 or not all(isinstance(a, torch.fx.Node) for a in linear.args):
        return False
    x, weight, bias = (a.meta.get("example_value") for a in linear.args)
    if x is None or weight is None or bias is None or weight.ndim != 2 or bias.ndim != 1:
        return False
    if x.device.type == "cuda" and torch.version.hip is not None:
        return False  # ROCm's hipBLASLt epilogue: neither its GELU nor its speed has been measured
    return (x.device.type in devices and x.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == weight.dtype == bias.dtype)


def use_gelu_epilogue(gm: torch.fx.GraphModule, devices: tuple[str, ...] | None = None) -> int:
    """Rewrite `gelu(linear(x, w, b), approximate="tanh")` in `gm` into one `linear_gelu(x, w, b)`.
    Returns how many were rewritten. `devices`: where the inputs must be (`DEVICES`; the tests also allow
    the CPU, where `linear_gelu` is the plain computation)."""
    devices = DEVICES if devices is None else devices
    rewritten = 0
    for gelu in [n for n in gm.graph.nodes if _is_tanh_gelu(n)]:
        linear = gelu.args[0]
        if not isinstance(linear, torch.fx.Node) or not _fits(linear, devices):
            continue
        with gm.graph.inserting_before(gelu):
            fused = gm.graph.call_function(linear_gelu, linear.args)
        fused.meta.update(gelu.meta)
        gelu.replace_all_uses_with(fused)
        gm.graph.erase_node(gelu)
        gm.graph.erase_node(linear)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
        log.info("diffboost: gelu-epilogue computes %d tanh-GELUs inside their linear layer's matrix multiply",
                 rewritten)
    return rewritten
