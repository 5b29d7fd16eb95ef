"""Pixel-wise softmax cross-entropy weighted per pixel (Ronneberger et al. 2015, eq. 1)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Mean over pixels of ``weights * cross_entropy(logits, target)``.

    Pixels with weight 0 are ignored: they contribute nothing to the loss or its gradient, and
    are left out of the mean.

    Parameters
    ----------
    logits : torch.Tensor, shape (N, K, H, W)
    target : torch.Tensor of int64, shape (N, H, W), classes in [0, K); any value where the
        weight is 0
    weights : torch.Tensor, shape (N, H, W), non-negative

    Returns
    -------
    torch.Tensor, scalar (0 when every weight is 0)
    """
    if logits.shape[-2:] != target.shape[-2:] or target.shape != weights.shape:
        raise ValueError(
            f"loss: expected logits (N, K, H, W) with target and weights (N, H, W), got "
            f"{tuple(logits.shape)}, {tuple(target.shape)}, {tuple(weights.shape)}"
        )
    used = weights > 0
    safe_target = torch.where(used, target, torch.zeros_like(target))
    per_pixel = F.cross_entropy(logits.float(), safe_target, reduction="none")
    count = used.sum()
    return (per_pixel * weights).sum() / count.clamp(min=1)


def distance_loss(logits: torch.Tensor, target: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of a sigmoid distance map against soft targets in [0, 1],
    over the ``used`` pixels (the distance mode's second output, :mod:`.targets`).

    Parameters
    ----------
    logits, target : torch.Tensor, shape (N, H, W)
    used : torch.Tensor of bool, shape (N, H, W)
        Pixels that count (not ignored).

    Returns
    -------
    torch.Tensor, scalar (0 when no pixel is used)
    """
    if not logits.shape == target.shape == used.shape:
        raise ValueError(
            f"loss: expected logits, target and mask of one shape (N, H, W), got "
            f"{tuple(logits.shape)}, {tuple(target.shape)}, {tuple(used.shape)}"
        )
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (per_pixel * used).sum() / used.sum().clamp(min=1)
