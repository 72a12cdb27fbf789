"""gelu-epilogue: a tanh-GELU applied to a linear layer's output (the MLPs of SD3, PixArt and Flux's
double blocks) is computed by cuBLAS inside the matrix multiply, as its epilogue
(`torch._addmm_activation`), instead of by a separate kernel that reads the wide hidden activation
back and writes it again. Done on the captured graph, like fuse-rope, so the model, its clones and
ComfyUI stay as they are.

Flux's single-stream blocks apply the GELU to the second part of a wider layer's output and
concatenate it with the attention's output for the next layer:
`linear2(cat(attention(split(linear1(h))[0]), gelu(split(linear1(h))[1])))`. There the first layer
becomes two (the GELU in the second one's epilogue) and the last one two summed over the parts, so
neither the concatenation nor a separate GELU pass is written.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from .fuse import LINEAR, example_value

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


def linear_of_pair(first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """linear(cat((first, second), -1), weight, bias) without the concatenation: the sum of each part
    times its columns of the weight (inductor fuses the sum with what follows)."""
    width = first.shape[-1]
    out = torch.nn.functional.linear(first, weight[:, :width], bias)
    return out + torch.nn.functional.linear(second, weight[:, width:])


def _is_tanh_gelu(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _GELU or len(node.args) != 1:
        return False
    return node.kwargs == {"approximate": "tanh"}


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_linear(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in LINEAR
            and not node.kwargs and len(node.args) == 3)


def _fits(linear: torch.fx.Node, devices: tuple[str, ...]) -> bool:
    """A linear layer with a bias (the epilogue adds it) and one user, with half-precision inputs on one
    of `devices`."""
    if not _is_linear(linear) or len(linear.users) != 1:
        return False
    x, weight, bias = (example_value(a) for a in linear.args)
    if x is None or weight is None or bias is None or weight.ndim != 2 or bias.ndim != 1:
        return False
    if x.device.type == "cuda" and torch.version.hip is not None:
        return False  # ROCm's hipBLASLt epilogue: neither its GELU nor its speed has been measured
    return (x.device.type in devices and x.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == weight.dtype == bias.dtype)


def _single_block(gelu: torch.fx.Node, devices: tuple[str, ...]):
    """(linear1, split, first part, attention output, cat, linear2) where `gelu` is Flux's single-stream
    block's: the last of two parts of linear1's output split on the last dimension, concatenated last
    with one other tensor on the last dimension, for linear2 alone. None for any other GELU."""
    part = gelu.args[0]
    if not (isinstance(part, torch.fx.Node) and part.target is operator.getitem and part.args[1] == 1
            and len(part.users) == 1):
        return None
    split = part.args[0]
    if not (split.op == "call_function" and split.target is torch.split and len(split.args) == 2
            and isinstance(split.args[1], (list, tuple)) and len(split.args[1]) == 2
            and all(isinstance(n, int) for n in split.args[1]) and split.kwargs.get("dim") in (-1, 2)):
        return None
    parts = list(split.users)
    first = next((n for n in parts if n.target is operator.getitem and n.args[1] == 0), None)
    if first is None or len(parts) != 2 or not _fits(split.args[0], devices):
        return None
    cat = _only_user(gelu)
    if not (cat is not None and cat.op == "call_function" and cat.target is torch.cat):
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    pieces = cat.args[0]
    linear2 = _only_user(cat)
    if not (isinstance(pieces, (list, tuple)) and len(pieces) == 2 and pieces[1] is gelu and _is_linear(linear2)
            and linear2.args[0] is cat and example_value(pieces[0]) is not None):
        return None
    last = example_value(pieces[0]).ndim - 1
    if dim not in (-1, last) or split.kwargs["dim"] not in (-1, example_value(split.args[0]).ndim - 1):
        return None
    return split.args[0], split, first, pieces[0], cat, linear2


def _rewrite_single_block(gm: torch.fx.GraphModule, gelu: torch.fx.Node, match) -> None:
    linear1, split, first, attention, cat, linear2 = match
    h, weight, bias = linear1.args
    width = split.args[1][0]
    graph = gm.graph
    with graph.inserting_before(split):
        rows = graph.call_function(operator.getitem, (weight, slice(None, width)))
        first_bias = graph.call_function(operator.getitem, (bias, slice(None, width)))
        new_first = graph.call_function(torch.nn.functional.linear, (h, rows, first_bias))
        mlp_rows = graph.call_function(operator.getitem, (weight, slice(width, None)))
        mlp_bias = graph.call_function(operator.getitem, (bias, slice(width, None)))
        mlp = graph.call_function(linear_gelu, (h, mlp_rows, mlp_bias))
    with graph.inserting_before(linear2):
        out = graph.call_function(linear_of_pair, (attention, mlp, *linear2.args[1:]))
    first.replace_all_uses_with(new_first)
    linear2.replace_all_uses_with(out)
    for node in (linear2, cat, gelu, gelu.args[0], first, split, linear1):
        graph.erase_node(node)


def use_gelu_epilogue(gm: torch.fx.GraphModule, devices: tuple[str, ...] | None = None) -> int:
    """Rewrite `gelu(linear(x, w, b), approximate="tanh")` in `gm` into one `linear_gelu(x, w, b)`.
    Returns how many were rewritten. `devices`: where the inputs must be (`DEVICES`; the tests also allow
    the CPU, where `linear_gelu` is the plain computation)."""
    devices = DEVICES if devices is None else devices
    rewritten = 0
    for gelu in [n for n in gm.graph.nodes if _is_tanh_gelu(n)]:
        linear = gelu.args[0]
        if not (isinstance(linear, torch.fx.Node) and _fits(linear, devices)):
            match = _single_block(gelu, devices)
            if match is not None:
                _rewrite_single_block(gm, gelu, match)
                rewritten += 1
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
