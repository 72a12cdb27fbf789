"""fuse_qkv: linear layers that read the same input (attention's q, k and v projections) become
one wider matrix multiply whose result is split again. Done on the captured graph, so the model's
own modules, and every clone that shares them, stay as they are."""

from __future__ import annotations

import torch
import torch.fx

LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)  # how a captured graph calls a linear layer


def example_value(arg):
    """The fake tensor dynamo recorded for a captured graph's node (its shape, dtype, device); None for
    a constant or where none was recorded."""
    return arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else None


def fuse_parallel_linears(gm: torch.fx.GraphModule) -> int:
    """Rewrite groups of `linear(x, w_i, b_i)` sharing `x` into one `linear(x, cat(w), cat(b))`
    followed by a split. Returns how many groups were fused. The weights are concatenated inside
    the graph on each call, so patched (LoRA) weights are always the ones used."""
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR and len(node.args) >= 2 and not node.kwargs:
            groups.setdefault(node.args[0], []).append(node)
    fused = 0
    for x, linears in groups.items():
        if len(linears) < 2:
            continue
        has_bias = [len(n.args) > 2 and n.args[2] is not None for n in linears]
        if any(has_bias) and not all(has_bias):
            continue  # mixing biased and unbiased layers would need a zero bias; rare, skip
        sizes = [_out_features(n) for n in linears]
        if None in sizes:
            continue
        # Insert at the last of the layers: every weight (and any cast of it) exists by then.
        # Skip the group if a result is used before that point.
        position = _position(gm)
        last = max(linears, key=position)
        if any(position(user) < position(last) for n in linears for user in n.users):
            continue
        with gm.graph.inserting_before(last):
            weight = gm.graph.call_function(torch.cat, ([n.args[1] for n in linears], 0))
            args = (x, weight)
            if all(has_bias):
                args += (gm.graph.call_function(torch.cat, ([n.args[2] for n in linears], 0)),)
            wide = gm.graph.call_function(torch.nn.functional.linear, args)
            parts = gm.graph.call_function(torch.split, (wide, sizes, -1))
            for i, n in enumerate(linears):
                part = gm.graph.call_function(_getitem, (parts, i))
                n.replace_all_uses_with(part)
        for n in linears:
            gm.graph.erase_node(n)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _getitem(seq, i):
    return seq[i]


def _out_features(node: torch.fx.Node) -> int | None:
    value = example_value(node.args[1])
    return int(value.shape[0]) if value is not None and value.dim() == 2 else None


def _position(gm: torch.fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__
