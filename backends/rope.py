"""fuse-rope: kernel libraries' rotary-embedding ops (comfy_kitchen's `apply_rope`, `apply_rope1`)
become the same arithmetic in plain torch on the captured graph, so that inductor fuses it with the
q/k normalisation and projection split around it instead of launching the library's own kernel.
Done on the graph, so the model, its clones and the library stay as they are."""

from __future__ import annotations

import torch
import torch.fx

# Interleaved RoPE: pair k of the last dimension is (x[2k], x[2k+1]), rotated by a 2x2 matrix of
# `freqs_cis[..., k, :, :]`. One function per op, each taking the op's arguments. The library's own
# plain-torch version lives in a module path internal to it (backends/eager), so it is written here.


def rope_one(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """`x` rotated by `freqs_cis`, computed in `freqs_cis`' dtype (float32) and returned in `x`'s."""
    if x.ndim > 2 and freqs_cis.ndim > 2 and x.shape[2] != 1 and freqs_cis.shape[2] > x.shape[2]:
        freqs_cis = freqs_cis[:, :, : x.shape[2]]  # a table longer than the sequence: the op trims it too
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def rope_pair(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_one(xq, freqs_cis), rope_one(xk, freqs_cis)


# The library ops this pass replaces, by their qualified name, with the plain-torch function.
PLAIN = {"comfy_kitchen::apply_rope": rope_pair, "comfy_kitchen::apply_rope1": rope_one}


def _op_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return None


def fuse_rope(gm: torch.fx.GraphModule) -> int:
    """Replace the RoPE ops of `gm` by their plain-torch arithmetic. Returns how many were replaced."""
    replaced = 0
    for node in gm.graph.nodes:
        plain = PLAIN.get(_op_name(node.target)) if node.op == "call_function" else None
        if plain is not None:
            node.target = plain
            replaced += 1
    if replaced:
        gm.recompile()
    return replaced
