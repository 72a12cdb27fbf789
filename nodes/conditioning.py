"""Conditioning moved to the GPU once per sampling run, instead of at every step.

ComfyUI keeps the text encoders' outputs (and the size/aspect conditions some models take) in CPU
memory and copies them to the GPU inside every denoiser call. A copy from pageable CPU memory waits
for the GPU to finish all queued work, so the host cannot queue step N+1 while step N runs: the GPU
then idles while Python prepares each step (on a compiled PixArt, 3 - 4.5 ms of a 36 ms step). Moving
the conditioning once, before the first step, takes the wait out of the loop; the values are the
same, so the result is too.
"""

from __future__ import annotations

import copy

import torch


def moved_to(model_conds: dict, device: torch.device) -> dict:
    """A copy of one conditioning's `model_conds` whose tensors are on `device`; the original's
    entries are left as they were (they may belong to a cached node output)."""
    moved = {}
    for name, cond in model_conds.items():
        tensor = getattr(cond, "cond", None)
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            cond = copy.copy(cond)
            cond.cond = tensor.to(device)
        moved[name] = cond
    return moved


def conditioning_on_device(executor, guider, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: run the sampler with the guider's conditioning on its model's device,
    and give the guider its own conditioning back afterwards."""
    conds, patcher = getattr(guider, "conds", None), getattr(guider, "model_patcher", None)
    if not isinstance(conds, dict) or patcher is None:  # a custom guider of another shape: leave it be
        return executor(guider, *args, **kwargs)
    device = torch.device(patcher.load_device)
    originals = dict(conds)  # the lists themselves are swapped, never changed: the guider gets them back
    try:
        for kind, entries in originals.items():
            conds[kind] = [{**entry, "model_conds": moved_to(entry["model_conds"], device)}
                           if "model_conds" in entry else entry for entry in entries]
        return executor(guider, *args, **kwargs)
    finally:
        conds.update(originals)
