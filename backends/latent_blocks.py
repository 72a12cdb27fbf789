"""A dynamic compile that sees the latent's height and width as multiples of 8.

With `dynamic` on, a latent of height h becomes a symbol, and every size after a stride-2
convolution is (h - 1) // 2 + 1: the kernels compute nested floor divisions at run time and no size
is known to be even. Passed as a (batch, channels, h/8, 8, w/8, 8) view with the 8s static, the sides
are 8*h' and 8*w', every downsampled size is an exact multiple, and inductor generates the simple
index arithmetic of a static compile (on SDXL's UNet on the CPU: 20 run-time floor divisions instead
of 4819). The view is put back together as the first operation of the graph, so the model sees the
tensor it always sees.

Latents whose sides are not multiples of 8 (images whose sides are not multiples of 64 px) run
through a plain dynamic compile: one more graph, for all such sizes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("diffboost")

BLOCK = 8


class LatentInBlocks(torch.nn.Module):
    """`inner`, called with its latent (first argument) as blocks: forward(blocks, ...) runs
    inner(blocks merged back to (batch, channels, height, width), ...). Holds `inner` without
    changing it."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, latent_blocks: torch.Tensor, *args, **kwargs):
        return self.inner(latent_blocks.flatten(4, 5).flatten(2, 3), *args, **kwargs)


def splits_into_blocks(x) -> bool:
    """Whether `x` is a 4-D latent whose sides are at least two blocks each. One block would be a
    side of 1, which torch specialises on (a graph of its own)."""
    return (torch.is_tensor(x) and x.dim() == 4
            and all(side % BLOCK == 0 and side >= 2 * BLOCK for side in x.shape[2:]))


def as_blocks(x: torch.Tensor) -> torch.Tensor:
    """The (batch, channels, h/8, 8, w/8, 8) view of `x` (no copy, any memory format), with the
    channels and the 8s marked static: only the batch and the block counts are symbols."""
    b, c, h, w = x.shape
    blocks = x.unflatten(3, (w // BLOCK, BLOCK)).unflatten(2, (h // BLOCK, BLOCK))
    for dim in (1, 3, 5):
        torch._dynamo.mark_static(blocks, dim)
    return blocks


def dispatching(in_blocks: Callable, plain: Callable) -> Callable:
    """Call `in_blocks` (a compile of LatentInBlocks) with the latent as blocks where it splits
    into them, else `plain` (a compile of the model itself). Says once which path each took."""
    told: set[bool] = set()

    def call(x, *args, **kwargs):
        split = splits_into_blocks(x)
        if split not in told:
            told.add(split)
            if split:
                log.info("diffboost: dynamic compile: the latent goes in as 8x8 blocks (every size whose sides "
                         "are multiples of 64 px shares this graph)")
            else:
                log.info("diffboost: dynamic compile: a latent of %s does not split into 8x8 blocks of at least "
                         "2 per side (image sides multiples of 64 px, at least 128 px): such sizes share a "
                         "second dynamic graph", "x".join(str(s) for s in x.shape[2:]) if torch.is_tensor(x) else x)
        if split:
            return in_blocks(as_blocks(x), *args, **kwargs)
        return plain(x, *args, **kwargs)

    return call
