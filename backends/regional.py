"""Block-by-block compilation (`regional`): each repeated block compiled once, as a region that CUDA
graphs can capture.

ComfyUI's Flux blocks (and SD1.5/SDXL's transformer blocks) add to their input in place
(`img += ...`, `x += ...`). Inductor's CUDA graph trees will not capture a compiled region that writes
into a tensor it did not allocate: it logs "skipping cudagraphs due to mutated inputs" and runs that
region's kernels from Python at every call, so a block-by-block step was launched kernel by kernel.
Each block is therefore compiled behind `ArgumentsCopied`, which copies the block's tensor arguments
inside the compiled region: functionalisation turns `x.clone(); x += y` into `x + y`, inductor drops
the copy, and the region then writes only its own buffers. The caller's tensors stay as they were; the
blocks return what they computed, which is what their callers use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .standin import repeated_blocks, replace_submodules, twin_calling


class ArgumentsCopied(torch.nn.Module):
    """Calls `block` on copies of its tensor arguments (the copies are meant to be traced, not run)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        args = tuple(_copied(a) for a in args)
        kwargs = {k: _copied(v) for k, v in kwargs.items()}
        return self.block(*args, **kwargs)


def _copied(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def compiled_block_by_block(module: torch.nn.Module,
                            compile_one: Callable[[torch.nn.Module, torch.nn.Module], Callable]) -> torch.nn.Module:
    """`module` with each repeated block swapped for a stand-in that calls its compiled region.
    `compile_one(block, region)` compiles `region` (the block behind `ArgumentsCopied`); `block` says
    which earlier compile may serve it."""
    blocks = repeated_blocks(module)
    return replace_submodules(
        module, lambda name, m: twin_calling(m, compile_one(m, ArgumentsCopied(m))) if type(m) in blocks else None)
