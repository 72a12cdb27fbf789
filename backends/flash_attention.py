"""flash-attn-4: torch's attention calls in a compiled graph run FlashAttention's CuTe kernels
(`flash_attn.cute`, the package flash-attn-4) where they are faster than torch's own.

Optional: used only where that package and NVIDIA's CuTe DSL are installed and the GPU is a Hopper
or Blackwell one; Compile Model says so at once when the flag is asked for elsewhere. Done on the
captured graph, like fuse-rope, so the model, its clones and ComfyUI stay as they are. The kernel is
one opaque op to inductor, captured in the step's CUDA graph (it is built at its first call, which
CUDA graph trees run before recording).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx

from .fuse import example_value

log = logging.getLogger("diffboost")

# Only long self-attention is handed over: on an H200 FlashAttention's CuTe kernel ran SD3's
# 4250-token attention 1.26x and PixArt's 4096-token one 1.12x faster than torch's, but SDXL's
# 1024-token level 2.9x slower. Prompt cross-attention (77 - 512 keys) stays with torch's kernels.
MIN_TOKENS = 2048
SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SDPA_EXTRA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@functools.cache
def unavailable_reason() -> str | None:
    """None where the kernels can run here, else what is missing, in words a user can act on."""
    if not torch.cuda.is_available():
        return "flash-attn-4 needs a CUDA GPU"
    major, _ = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return f"flash-attn-4 runs on Hopper or Blackwell GPUs (compute capability 9.x or 10.x), this is {major}.x"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # ImportError, or the CuTe DSL failing to find its libraries
        # --pre: the package has only beta releases (its one final release, 0.0.1, is a yanked placeholder).
        return f"flash-attn-4 is not installed ({type(e).__name__}: {e}); pip install --pre flash-attn-4"
    return None


def _define():
    """Define the op diffboost::flash_attention; returns it."""

    @torch.library.custom_op("diffboost::flash_attention", mutates_args=())
    def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(q kᵀ · scale) v over (batch, tokens, heads, head dim) inputs, on the GPU."""
        if not is_long(q.shape[1], k.shape[1]):  # a token count the graph left symbolic, short this time
            return sdpa_reference(q, k, v, scale)
        from flash_attn.cute import flash_attn_func

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        with torch.no_grad():
            return flash_attn_func(q, k, v, softmax_scale=scale)[0]

    @flash_attention.register_fake
    def _(q, k, v, scale):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    # The same arithmetic through torch's SDPA: a reference, so that graphs using the op run anywhere.
    flash_attention.register_kernel("cpu")(sdpa_reference)
    return flash_attention


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The op's arithmetic through torch's SDPA, in the op's (batch, tokens, heads, dim) layout."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


def is_long(q_tokens: int, k_tokens: int) -> bool:
    """Whether FlashAttention's kernel is the faster one for this many query and key tokens."""
    return q_tokens >= MIN_TOKENS and k_tokens >= MIN_TOKENS


# Defined once per process: ComfyUI loads the pack as its own copy of these modules beside the
# installed package (quant/kernels.py does the same).
flash_attention = (torch.ops.diffboost.flash_attention if hasattr(torch.ops.diffboost, "flash_attention")
                   else _define())


def sdpa_as_flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False):
    """torch's SDPA call (inputs batch, heads, tokens, dim) through `flash_attention`; only for the
    calls `use_flash_attention` sends (no mask, no dropout, not causal)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    return out.transpose(1, 2)


def unfit_reason(q, k, v) -> str | None:
    """Why an SDPA call on these (batch, heads, tokens, dim) tensors stays with torch's kernels, or None
    where it goes to FlashAttention: half precision, the same heads for q, k and v, a head dim the
    kernels take, long sequences. Token counts may be symbolic (the prompt's length is, so that a new
    prompt does not recompile; a `regional` block's whole sequence is): one that is long for every
    value goes; one that may be short goes where it was long in the call the graph was traced for
    (Flux's single blocks), and the op then compares it with MIN_TOKENS at each call; neither adds a
    guard after the trace. Batch, heads and head dim must be fixed."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in (q, k, v)):
        return "inputs are not 4-D tensors"
    if not all(isinstance(s, int) for t in (q, k, v) for s in (t.shape[0], t.shape[1], t.shape[3])):
        return f"symbolic batch, heads or head dim {tuple(q.shape)}"
    d = q.shape[-1]
    if not (q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.shape[1] == k.shape[1] == v.shape[1] and k.shape[-1] == v.shape[-1] == d
            and d % 8 == 0 and 8 <= d <= 256):
        return f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not all(statically_known_true(n >= MIN_TOKENS) or _traced_value(n) >= MIN_TOKENS
               for n in (q.shape[2], k.shape[2])):
        return f"{q.shape[2]} and {k.shape[2]} tokens"
    return None


def _traced_value(n) -> int:
    """A size's value in the call the graph was traced for (0 where the trace holds none)."""
    if isinstance(n, int):
        return n
    hint = getattr(n.node, "hint", None)
    return hint if isinstance(hint, int) else 0


def _unfit_call(node: torch.fx.Node, devices: tuple[str, ...]) -> str | None:
    extra = dict(zip(SDPA_EXTRA_ARGS, node.args[3:], strict=False)) | dict(node.kwargs)
    if extra.get("attn_mask") is not None or extra.get("is_causal", False) is not False \
            or extra.get("dropout_p", 0.0) != 0.0 or extra.get("enable_gqa", False) is not False \
            or isinstance(extra.get("scale"), torch.fx.Node):
        return "a mask, dropout, causal attention or a computed scale"
    tensors = [example_value(a) for a in node.args[:3]]
    if len(tensors) < 3 or tensors[0] is None:
        return "inputs unknown"
    return unfit_reason(*tensors) or (None if tensors[0].device.type in devices else f"on {tensors[0].device}")


def use_flash_attention(gm: torch.fx.GraphModule, devices: tuple[str, ...] = ("cuda",)) -> int:
    """Send the SDPA calls of `gm` that qualify to FlashAttention. Returns how many were sent. `devices`:
    where their inputs must be (the GPU; the tests also allow the CPU, where the op is a reference)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]
    kept: dict[str, int] = {}
    for node in calls:
        reason = _unfit_call(node, devices)
        if reason is None:
            node.target = sdpa_as_flash_attention
        else:
            kept[reason] = kept.get(reason, 0) + 1
    replaced = len(calls) - sum(kept.values())
    if replaced:
        gm.recompile()
    if calls:
        log.info("diffboost: flash-attn-4 runs %d of %d attention calls%s", replaced, len(calls),
                 "; torch's kernels keep " + ", ".join(f"{n} ({why})" for why, n in kept.items()) if kept else "")
    return replaced
