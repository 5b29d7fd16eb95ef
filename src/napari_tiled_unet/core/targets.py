"""Training targets from instance ids, computed after augmentation (on the training device).

Two output modes:

- ``"paper"`` (2 classes, Ronneberger et al. 2015): background / foreground, with touching
  objects already separated by a one-pixel background gap (:func:`~.weights.separate_touching`).
- ``"boundary"`` (3 classes): background / interior / boundary, where an object's boundary is its
  pixels that have a pixel of another id (background or another object) among their 8
  neighbours. Touching objects are then split by a two-pixel boundary band, and interiors serve
  as watershed seeds at inference (:func:`~.postprocess.label_plane`).

Targets are derived from the ids *after* the geometric augmentation so that a zoomed-out patch
still has a boundary of one pixel per object.
"""

from __future__ import annotations

MODES = {2: "paper", 3: "boundary"}


def output_mode(n_classes: int) -> str:
    """The output mode of a model with ``n_classes`` outputs: "paper" (2) or "boundary" (3).

    Raises
    ------
    ValueError
        For any other class count.
    """
    if n_classes not in MODES:
        raise ValueError(f"n_classes: expected 2 (paper) or 3 (boundary), got {n_classes!r}")
    return MODES[n_classes]


def n_classes_of(mode: str) -> int:
    """Inverse of :func:`output_mode`."""
    for count, name in MODES.items():
        if name == mode:
            return count
    raise ValueError(f"mode: expected one of {sorted(MODES.values())}, got {mode!r}")


def engine_output(n_classes: int) -> str:
    """What the engine must return for a model's decoder (:func:`~.postprocess.decode_plane`):
    the foreground probability ("foreground") for 2 classes, the class maps ("classes") for 3."""
    return "classes" if n_classes == 3 else "foreground"


def class_target(ids, n_classes: int):
    """Per-pixel class of instance ids.

    Parameters
    ----------
    ids : torch.Tensor of int64, shape (N, H, W)
        Instance ids, 0 = background.
    n_classes : {2, 3}

    Returns
    -------
    torch.Tensor of int64, shape (N, H, W)
        2 classes: 0 background, 1 foreground. 3 classes: 0 background, 1 interior, 2 boundary.
    """
    import torch
    from torch.nn import functional as F

    foreground = ids > 0
    if output_mode(n_classes) == "paper":
        return foreground.long()
    as_float = ids.double()[:, None]  # exact for ids below 2**53
    padded = F.pad(as_float, (1, 1, 1, 1), mode="replicate")
    largest = F.max_pool2d(padded, 3, stride=1)[:, 0]
    smallest = -F.max_pool2d(-padded, 3, stride=1)[:, 0]
    edge = (largest != ids.double()) | (smallest != ids.double())
    target = foreground.long()
    return torch.where(foreground & edge, torch.full_like(target, 2), target)
