"""joint-qkv: SD3's joint attention without copying its queries, keys and values together.

Each SD3 block projects the prompt's tokens and the image's tokens to q/k/v with two layers, then
concatenates the two along the tokens for the attention: three copies of the whole q, k and v a
block (on an H200, 1.0 ms of SD3's 37.6 ms step). Here both projections write their rows of one shared
buffer (`joint_linear`) and the attention reads q, k and v as column slices of it. Done on the captured
graph, like fuse-rope, so the model, its clones and ComfyUI stay as they are.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fuse import LINEAR, example_value

log = logging.getLogger("diffboost")

DEVICES = ("cuda",)  # where the pass rewrites: on the GPU the layers write straight into the shared buffer

# The operations that only look at a tensor differently (no arithmetic), as the captured graph calls them.
_VIEW_METHODS = {"reshape", "view", "movedim", "permute", "transpose", "unflatten", "flatten"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.movedim, torch.permute, torch.transpose, torch.unflatten,
                   torch.flatten}


def _define():
    """Define the op diffboost::joint_linear; returns it."""

    @torch.library.custom_op("diffboost::joint_linear", mutates_args=())
    def joint_linear(a: torch.Tensor, weight_a: torch.Tensor, bias_a: torch.Tensor | None, b: torch.Tensor,
                     weight_b: torch.Tensor, bias_b: torch.Tensor | None) -> torch.Tensor:
        """cat((linear(a, weight_a, bias_a), linear(b, weight_b, bias_b)), dim=1) for (batch, tokens,
        features) inputs, each layer's rows written in place into the result (no concatenation)."""
        out = a.new_empty((a.shape[0], a.shape[1] + b.shape[1], weight_a.shape[0]))
        for i in range(a.shape[0]):
            # One sample's rows of `out` are one contiguous block: the matmul (with its bias in cuBLAS's
            # epilogue) writes there directly.
            for x, weight, bias, rows in ((a, weight_a, bias_a, slice(0, a.shape[1])),
                                          (b, weight_b, bias_b, slice(a.shape[1], None))):
                if bias is None:
                    torch.mm(x[i], weight.t(), out=out[i, rows])
                else:
                    torch.addmm(bias, x[i], weight.t(), out=out[i, rows])
        return out

    @joint_linear.register_fake
    def _(a, weight_a, bias_a, b, weight_b, bias_b):
        return a.new_empty((a.shape[0], a.shape[1] + b.shape[1], weight_a.shape[0]))

    return joint_linear


# Defined once per process: ComfyUI loads the pack as its own copy of these modules beside the
# installed package (flash_attention.py does the same).
joint_linear = (torch.ops.diffboost.joint_linear if hasattr(torch.ops.diffboost, "joint_linear") else _define())


def _is_view(node) -> bool:
    if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function" or node.target not in _VIEW_FUNCTIONS:
        return False
    if node.target is operator.getitem:  # an index of ints and slices, not of a tensor
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index)
    return True


def _projection(part: torch.fx.Node, devices: tuple[str, ...]):
    """(layer, first column, trailing shape) where `part` is `layer`'s output columns [first, first +
    width), seen through views only as (batch, tokens, *trailing shape); None otherwise."""
    node = part
    while _is_view(node):
        node = node.args[0]
    if not (node.op == "call_function" and node.target in LINEAR and not node.kwargs and len(node.args) in (2, 3)):
        return None
    out, seen = example_value(node), example_value(part)
    if out is None or seen is None or out.ndim != 3 or seen.ndim < 3 or out.device.type not in devices:
        return None
    if not torch._C._is_alias_of(seen, out):
        return None  # a copy on the way (a reshape that could not view): not a column slice
    batch, tokens, features = out.shape
    trailing = tuple(seen.shape[2:])
    width = math.prod(trailing)
    first = seen.storage_offset() - out.storage_offset()
    expected = [batch, tokens, *trailing]
    strides = [tokens * features, features]
    inner = [1]
    for size in reversed(trailing[1:]):
        inner.insert(0, inner[0] * size)
    strides += inner
    fits = (isinstance(batch, int) and isinstance(first, int) and isinstance(width, int)
            and all(isinstance(s, int) for s in trailing) and 0 <= first and first + width <= features
            and all(statically_known_true(a == b) for a, b in zip(seen.shape, expected, strict=True))
            and all(statically_known_true(a == b) for a, b in zip(seen.stride(), strides, strict=True)))
    return (node, first, trailing) if fits else None


def _concatenations(gm: torch.fx.GraphModule, devices: tuple[str, ...]) -> dict:
    """{(prompt's layer, image's layer): [(cat, first column, trailing shape), ...]} for each concatenation
    along the tokens of two column slices, the same columns of two layers."""
    found: dict = {}
    for cat in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]:
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2
                and all(isinstance(p, torch.fx.Node) for p in parts)):
            continue
        a, b = (_projection(p, devices) for p in parts)
        if a is None or b is None or a[1:] != b[1:] or dim not in (1, 1 - example_value(parts[0]).ndim):
            continue
        (layer_a, *_), (layer_b, *_) = a, b
        out_a, out_b = example_value(layer_a), example_value(layer_b)
        if layer_a is layer_b or out_a.shape[0] != out_b.shape[0] or out_a.shape[2] != out_b.shape[2] \
                or out_a.dtype != out_b.dtype or (len(layer_a.args) == 3) != (len(layer_b.args) == 3):
            continue
        found.setdefault((layer_a, layer_b), []).append((cat, *a[1:]))
    return found


def _ends(layer: torch.fx.Node) -> set:
    """The nodes that use `layer`'s output other than to view it."""
    ends, todo = set(), [layer]
    while todo:
        node = todo.pop()
        for user in node.users:
            if _is_view(user) and user.args[0] is node:
                todo.append(user)
            else:
                ends.add(user)
    return ends


def use_joint_qkv(gm: torch.fx.GraphModule, devices: tuple[str, ...] | None = None) -> int:
    """Rewrite each pair of layers whose outputs are only concatenated column block by column block
    (SD3's prompt and image q/k/v) into one `joint_linear`. Returns how many concatenations went.
    `devices`: where the inputs must be (`DEVICES`; the tests also allow the CPU)."""
    devices = DEVICES if devices is None else devices
    graph, order = gm.graph, {n: i for i, n in enumerate(gm.graph.nodes)}
    rewritten = 0
    for (layer_a, layer_b), cats in _concatenations(gm, devices).items():
        if not (_ends(layer_a) | _ends(layer_b)) <= {cat for cat, *_ in cats}:
            continue  # a layer's output is also used elsewhere: it would be computed twice
        args = lambda layer: (*layer.args, None) if len(layer.args) == 2 else layer.args  # noqa: E731
        with graph.inserting_after(max(layer_a, layer_b, key=order.get)):
            joint = graph.call_function(torch.ops.diffboost.joint_linear.default, (*args(layer_a), *args(layer_b)))
        batch = example_value(layer_a).shape[0]
        for cat, first, trailing in cats:
            with graph.inserting_before(cat):
                block = slice(first, first + math.prod(trailing))
                columns = graph.call_function(operator.getitem, (joint, (slice(None), slice(None), block)))
                seen = graph.call_method("view", (columns, batch, -1, *trailing)) if len(trailing) > 1 else columns
            cat.replace_all_uses_with(seen)
            graph.erase_node(cat)
            rewritten += 1
        _erase_unused_views(graph, (layer_a, layer_b))
    if rewritten:
        graph.lint()
        gm.recompile()
        log.info("joint-qkv writes %d concatenated q/k/v inputs of the attention in place", rewritten)
    return rewritten


def _erase_unused_views(graph: torch.fx.Graph, layers) -> None:
    """Remove the layers and the views of their outputs that nothing uses any more."""
    chain, todo = [], list(layers)
    while todo:
        node = todo.pop()
        chain.append(node)
        todo.extend(u for u in node.users if _is_view(u) and u.args[0] is node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(chain), key=order.get, reverse=True):  # users before what they use
        if not node.users:
            graph.erase_node(node)
