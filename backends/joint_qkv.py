"""joint-qkv: SD3's joint attention without copying its queries, keys and values together.

Each SD3 block projects the prompt's tokens and the image's tokens to q/k/v with two layers, then
concatenates the two along the tokens for the attention: three copies of the whole q, k and v a
block (on an H200, 1.0 ms of SD3's 37.6 ms step). Here both projections write their rows of one shared
buffer (`joint_linear`) and the attention reads q, k and v as column slices of it. The projections may
be linear layers or Quantize FP8's layers (torch._scaled_mm), in any mix: by default Quantize FP8 keeps
the prompt's layers in high precision and makes the image's FP8. Done on the captured graph, like
fuse-rope, so the model, its clones and ComfyUI stay as they are.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import NamedTuple

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
    def joint_linear(batch: int, a: list[torch.Tensor | None], b: list[torch.Tensor | None], dtype: torch.dtype,
                     fast_accum: bool) -> torch.Tensor:
        """cat((layer_a(x_a), layer_b(x_b)), dim=1) as (batch, tokens, features), each layer's rows written
        in place into the result (no concatenation). A layer is [x, weight, bias, x_scale, weight_scale]:
        a linear one (x_scale None: x (batch, tokens, in), weight (out, in)) or an FP8 one (torch._scaled_mm's
        operands: e4m3 x (batch * tokens, in) with its scales, weight (in, out))."""
        split = _tokens(a, batch)
        out = a[0].new_empty((batch, split + _tokens(b, batch), _features(a)), dtype=dtype)
        for i in range(batch):
            # One sample's rows of `out` are one contiguous block: the matmul (with its bias in cuBLAS's
            # epilogue) writes there directly.
            for (x, weight, bias, x_scale, weight_scale), rows in ((a, slice(0, split)), (b, slice(split, None))):
                x = x.reshape(batch, -1, x.shape[-1])[i]
                if x_scale is not None:
                    scale = x_scale.reshape(batch, -1, 1)[i] if x_scale.numel() > 1 else x_scale  # per row or tensor
                    torch._scaled_mm(x, weight, scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=dtype,
                                     use_fast_accum=fast_accum, out=out[i, rows])
                elif bias is None:
                    torch.mm(x, weight.t(), out=out[i, rows])
                else:
                    torch.addmm(bias, x, weight.t(), out=out[i, rows])
        return out

    @joint_linear.register_fake
    def _(batch, a, b, dtype, fast_accum):
        return a[0].new_empty((batch, _tokens(a, batch) + _tokens(b, batch), _features(a)), dtype=dtype)

    return joint_linear


def _tokens(layer: list, batch: int):
    x, x_scale = layer[0], layer[3]
    return x.shape[1] if x_scale is None else x.shape[0] // batch  # an FP8 layer's rows are batch * tokens


def _features(layer: list):
    weight, x_scale = layer[1], layer[3]
    return weight.shape[0] if x_scale is None else weight.shape[1]  # torch._scaled_mm takes it as (in, out)


# Defined once per process: ComfyUI loads the pack as its own copy of these modules beside the
# installed package (flash_attention.py does the same).
joint_linear = (torch.ops.diffboost.joint_linear if hasattr(torch.ops.diffboost, "joint_linear") else _define())

# torch._scaled_mm's arguments in its schema's order, to read a captured call whichever way it was written.
_SCALED_MM_ARGS = ("self", "mat2", "scale_a", "scale_b", "bias", "scale_result", "out_dtype", "use_fast_accum")


class Layer(NamedTuple):
    """A projection in the captured graph: its node, [x, weight, bias, x_scale, weight_scale] for
    joint_linear, and whether an FP8 one accumulates fast."""

    node: torch.fx.Node
    parts: list
    fast_accum: bool


def _layer(node) -> Layer | None:
    """The linear or FP8 (torch._scaled_mm) layer that `node` calls, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in LINEAR and not node.kwargs and len(node.args) in (2, 3):
        x, weight, *bias = node.args
        return Layer(node, [x, weight, bias[0] if bias else None, None, None], False)
    if node.target is torch._scaled_mm:
        args = dict(zip(_SCALED_MM_ARGS[:len(node.args)], node.args, strict=True)) | dict(node.kwargs)
        if set(args) - set(_SCALED_MM_ARGS) or args.get("scale_result") is not None:
            return None
        return Layer(node, [args["self"], args["mat2"], args.get("bias"), args["scale_a"], args["scale_b"]],
                     bool(args.get("use_fast_accum", False)))
    return None


def _is_view(node) -> bool:
    if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_method":
        if node.target == "to":  # an FP8 layer's cast to the dtype it already has returns its input
            seen, source = example_value(node), example_value(node.args[0])
            return seen is not None and source is not None and torch._C._is_alias_of(seen, source)
        return node.target in _VIEW_METHODS
    if node.op != "call_function" or node.target not in _VIEW_FUNCTIONS:
        return False
    if node.target is operator.getitem:  # an index of ints and slices, not of a tensor
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index)
    return True


def _projection(part: torch.fx.Node, devices: tuple[str, ...]):
    """(layer, first column, trailing shape, batch) where `part` is a layer's output columns [first,
    first + width), seen through views only as (batch, tokens, *trailing shape); None otherwise. The layer's
    output is (batch, tokens, features), or (batch * tokens, features) for an FP8 layer."""
    node = part
    while _is_view(node):
        node = node.args[0]
    layer = _layer(node)
    out, seen = example_value(node), example_value(part)
    if layer is None or out is None or seen is None or seen.ndim < 3 or out.device.type not in devices \
            or out.ndim != (3 if layer.parts[3] is None else 2):  # what joint_linear takes of each kind
        return None
    if not torch._C._is_alias_of(seen, out):
        return None  # a copy on the way (a reshape that could not view): not a column slice
    batch, tokens, *trailing = seen.shape
    features = out.shape[-1]
    width = math.prod(trailing)
    first = seen.storage_offset() - out.storage_offset()
    rows = [batch * tokens] if out.ndim == 2 else [batch, tokens]
    strides = [tokens * features, features]
    inner = [1]
    for size in reversed(trailing[1:]):
        inner.insert(0, inner[0] * size)
    strides += inner
    fits = (isinstance(batch, int) and isinstance(first, int) and isinstance(width, int)
            and all(isinstance(s, int) for s in trailing) and 0 <= first and first + width <= features
            and all(statically_known_true(a == b) for a, b in zip(out.shape[:-1], rows, strict=True))
            and all(statically_known_true(a == b) for a, b in zip(seen.stride(), strides, strict=True)))
    return (layer, first, tuple(trailing), batch) if fits else None


def _concatenations(gm: torch.fx.GraphModule, devices: tuple[str, ...]) -> dict:
    """{(prompt's layer node, image's): (their Layers, batch, [(cat, first column, trailing shape), ...])}
    for each concatenation along the tokens of two column slices, the same columns of two layers."""
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
        (layer_a, first, trailing, batch), layer_b = a, b[0]
        out_a, out_b = example_value(layer_a.node), example_value(layer_b.node)
        both_fp8 = layer_a.parts[3] is not None and layer_b.parts[3] is not None
        if layer_a.node is layer_b.node or out_a.shape[-1] != out_b.shape[-1] or out_a.dtype != out_b.dtype \
                or (both_fp8 and layer_a.fast_accum != layer_b.fast_accum):
            continue
        entry = found.setdefault((layer_a.node, layer_b.node), ((layer_a, layer_b), batch, []))
        entry[2].append((cat, first, trailing))
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
    for (node_a, node_b), ((layer_a, layer_b), batch, cats) in _concatenations(gm, devices).items():
        if not (_ends(node_a) | _ends(node_b)) <= {cat for cat, *_ in cats}:
            continue  # a layer's output is also used elsewhere: it would be computed twice
        with graph.inserting_after(max(node_a, node_b, key=order.get)):
            joint = graph.call_function(torch.ops.diffboost.joint_linear.default, (
                batch, layer_a.parts, layer_b.parts, example_value(node_a).dtype,
                layer_a.fast_accum or layer_b.fast_accum))
        for cat, first, trailing in cats:
            with graph.inserting_before(cat):
                block = slice(first, first + math.prod(trailing))
                columns = graph.call_function(operator.getitem, (joint, (slice(None), slice(None), block)))
                seen = graph.call_method("view", (columns, batch, -1, *trailing)) if len(trailing) > 1 else columns
            cat.replace_all_uses_with(seen)
            graph.erase_node(cat)
            rewritten += 1
        _erase_unused_views(graph, (node_a, node_b))
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
