"""How far a result is from a reference: relative error and cosine similarity, in float64."""

from __future__ import annotations

import math

import torch


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """||result - reference|| / ||reference||. NaN when either holds NaN/inf or the shapes differ;
    inf when the reference is all zeros and the result is not."""
    if result.shape != reference.shape:
        return math.nan
    a = result.detach().double().cpu()
    b = reference.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.nan
    num = float((a - b).norm())
    den = float(b.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def cosine_similarity(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine of the angle between the two tensors taken as flat vectors; NaN when undefined."""
    if result.shape != reference.shape:
        return math.nan
    a = result.detach().double().cpu().flatten()
    b = reference.detach().double().cpu().flatten()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.nan
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else math.nan
    return float(a @ b) / (na * nb)
