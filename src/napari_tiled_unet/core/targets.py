"""Training targets from instance ids, computed after augmentation (on the training device).

Three output modes:

- ``"paper"`` (2 classes, Ronneberger et al. 2015): background / foreground, with touching
  objects already separated by a one-pixel background gap (:func:`~.weights.separate_touching`).
- ``"boundary"`` (3 classes): background / interior / boundary, where an object's boundary is its
  pixels that have a pixel of another id (background or another object) among their 8
  neighbours. Touching objects are then split by a two-pixel boundary band, and interiors serve
  as watershed seeds at inference (:func:`~.postprocess.label_plane`).
- ``"distance"`` (3 outputs): background / foreground logits as in the paper (gapped target,
  border-weighted loss), plus a map of each foreground pixel's distance to its object's edge,
  scaled to 1 at the object's centre (regressed through a sigmoid). At inference the peaks of
  the distance map seed a watershed over the foreground (:func:`~.postprocess.label_distance_plane`).

Targets are derived from the ids *after* the geometric augmentation so that a zoomed-out patch
still has a boundary of one pixel per object.
"""

from __future__ import annotations

from .config import n_classes_of, output_mode

__all__ = ["class_target", "distance_target", "engine_output", "n_classes_of", "output_mode"]


def engine_output(config) -> str:
    """What the engine must return for a model's decoder (:func:`~.postprocess.decode_plane`):
    the foreground probability ("foreground") for the paper's 2 classes, else all maps
    ("classes")."""
    return "foreground" if config.output_mode == "paper" else "classes"


def distance_target(ids):
    """Each foreground pixel's distance to its object's edge (a pixel of another id among its
    8 neighbours, or the patch border), divided by the largest such distance in its object;
    0 on the background.

    Parameters
    ----------
    ids : torch.Tensor of int64, shape (N, H, W)

    Returns
    -------
    torch.Tensor of float32, shape (N, H, W), values in [0, 1], on the device of ``ids``
    """
    import numpy as np
    import torch
    from scipy import ndimage

    edge = (class_target(ids, 3) == 2).cpu().numpy()
    labels = ids.cpu().numpy()
    out = np.zeros(labels.shape, np.float32)
    for index, (plane, rim) in enumerate(zip(labels, edge)):
        inside = (plane > 0) & ~rim
        distance = ndimage.distance_transform_edt(np.pad(inside, 1)).astype(np.float32)[1:-1, 1:-1]
        distance[plane > 0] += 1.0  # the rim is 1 px from its object's edge
        found = np.unique(plane[plane > 0])
        if found.size:
            largest = np.zeros(int(plane.max()) + 1, np.float32)
            largest[found] = ndimage.maximum(distance, plane, found)
            out[index] = np.where(plane > 0, distance / largest[plane].clip(min=1.0), 0.0)
    return torch.from_numpy(out).to(ids.device)


def class_target(ids, n_classes: int):
    """Per-pixel class of instance ids.

    Parameters
    ----------
    ids : torch.Tensor of int64, shape (N, H, W)
        Instance ids, 0 = background.
    n_classes : {2, 3}
        2: background / foreground; 3: background / interior / boundary.

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
