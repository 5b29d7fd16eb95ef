"""Training targets and the border weight map of Ronneberger et al. (2015).

The network learns to separate touching cells because (1) the target forces a background gap
between touching objects and (2) the loss weights that thin background heavily:

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))     on background pixels,

with d1, d2 the distances to the nearest and second-nearest object. Each object's distances are
computed only inside its bounding box grown by the radius beyond which the term is negligible,
so the cost grows with the number of objects times their neighbourhood, not with objects times
the image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

CUTOFF = 1e-3
VARIANTS = ("paper", "fiji")
# (w0, sigma in px) of each variant: the U-Net paper's, and the Fiji U-Net plugin's.
VARIANT_DEFAULTS = {"paper": (10.0, 5.0), "fiji": (50.0, 6.0)}
_EIGHT = np.ones((3, 3), bool)


def separate_touching(labels: np.ndarray) -> np.ndarray:
    """Remove the pixels where two objects touch, so no two objects stay 8-connected.

    A pixel becomes background when its 3x3 neighbourhood holds another object's id. An object
    that would vanish entirely keeps its pixels (its neighbours give way instead), so the object
    count is kept.

    Parameters
    ----------
    labels : numpy.ndarray, shape (Y, X), integer ids (0 = background)

    Returns
    -------
    numpy.ndarray, shape (Y, X), same dtype
    """
    labels = np.asarray(labels)
    ids = labels.astype(np.int64)
    above = int(ids.max(initial=0)) + 1  # stands for background in the minimum filter
    largest = ndimage.maximum_filter(ids, footprint=_EIGHT, mode="constant", cval=0)
    smallest = ndimage.minimum_filter(
        np.where(ids > 0, ids, above), footprint=_EIGHT, mode="constant", cval=above
    )
    conflict = (labels > 0) & ((largest != labels) | (smallest != labels))
    ids = np.unique(labels[labels > 0])
    # ids that keep no pixel; sets, not a table sized by the largest id (which may be ~2**32)
    vanishing = np.setdiff1d(ids, np.unique(labels[(labels > 0) & ~conflict]))
    if vanishing.size:
        # Keep the small object whole; its neighbours' touching pixels are already in conflict.
        conflict &= ~np.isin(labels, vanishing)
    return np.where(conflict, 0, labels).astype(labels.dtype, copy=False)


def border_weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    *,
    variant: str = "paper",
    pixel_size: float | tuple[float, float] | None = None,
    class_balance: bool = True,
    annotated: np.ndarray | None = None,
) -> np.ndarray:
    """Per-pixel loss weights that emphasise the background between nearby objects.

    Parameters
    ----------
    labels : numpy.ndarray, shape (Y, X) or (..., Y, X)
        Instance ids (0 = background), gaps already made (see :func:`separate_touching`).
        Stacks are weighted plane by plane.
    w0 : float
        Weight of the separation term (paper: 10; Fiji plugin: 50).
    sigma : float
        Width of the separation term, in pixels, or in physical units when ``pixel_size`` is
        given (paper: 5 px; Fiji plugin: 6 px).
    variant : {"paper", "fiji"}
        "paper": ``w_c`` balances class frequencies (``N / (2 N_class)``, or 1 without
        ``class_balance``). "fiji": foreground 1, background
        ``0.1 + 0.9 * exp(-d1**2 / (2 * 10**2))`` (the Fiji U-Net plugin's weighting).
    pixel_size : float or (float, float), optional
        Physical size of a pixel along (Y, X); distances are then physical.
    class_balance : bool
        For the "paper" variant, balance class frequencies in ``w_c``.
    annotated : numpy.ndarray of bool, optional, shape of ``labels``
        Where the annotation is complete (default: everywhere). Class frequencies are counted
        there only: unannotated pixels are not background, and counting them as such would
        weight the foreground of a small painted region many times over.

    Returns
    -------
    numpy.ndarray of float32, the shape of ``labels``
    """
    labels = np.asarray(labels)
    annotated = np.ones(labels.shape, bool) if annotated is None else np.asarray(annotated, bool)
    _check_weight_options(labels, w0, sigma, variant)
    if annotated.shape != labels.shape:
        raise ValueError(
            f"annotated: expected the shape of labels {labels.shape}, got {annotated.shape}"
        )
    if labels.ndim > 2:
        flat = labels.reshape((-1,) + labels.shape[-2:])
        masks = annotated.reshape(flat.shape)
        planes = [
            border_weight_map(
                p,
                w0,
                sigma,
                variant=variant,
                pixel_size=pixel_size,
                class_balance=class_balance,
                annotated=m,
            )
            for p, m in zip(flat, masks)
        ]
        return np.stack(planes).reshape(labels.shape)
    sampling = _sampling(pixel_size)
    foreground = labels > 0
    weights = _class_weights(foreground, annotated, variant, class_balance, sampling)
    separation = separation_term(labels, w0, sigma, sampling)
    weights[~foreground] += separation[~foreground]
    return weights


def separation_term(labels: np.ndarray, w0: float, sigma: float, sampling=(1.0, 1.0)) -> np.ndarray:
    """``w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` for every pixel, set to 0 where it is below
    ``CUTOFF`` (that is, where d1 + d2 exceeds the cut-off radius).

    Returns
    -------
    numpy.ndarray of float32, shape (Y, X)
    """
    if w0 <= CUTOFF:
        return np.zeros(labels.shape, np.float32)
    radius = sigma * math.sqrt(2.0 * math.log(w0 / CUTOFF))
    d1, d2 = _two_nearest_distances(labels, radius, sampling)
    term = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    term[(d1 + d2) > radius] = 0.0
    return term.astype(np.float32)


def _two_nearest_distances(labels, radius, sampling):
    """Distances to the nearest and second-nearest object, exact up to ``radius`` (inf beyond)."""
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    pad = [int(math.ceil(radius / s)) + 1 for s in sampling]
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(b.start - p, 0), min(b.stop + p, n))
            for b, p, n in zip(box, pad, labels.shape)
        )
        distance = ndimage.distance_transform_edt(labels[window] != index, sampling=sampling)
        near1, near2 = d1[window], d2[window]
        closer = distance < near1
        near2[:] = np.where(closer, near1, np.minimum(near2, distance))
        near1[:] = np.where(closer, distance, near1)
    return d1, d2


def _class_weights(foreground, annotated, variant, class_balance, sampling):
    weights = np.ones(foreground.shape, np.float32)
    if variant == "fiji":
        if foreground.any():
            d1 = ndimage.distance_transform_edt(~foreground, sampling=sampling)
        else:
            d1 = np.full(foreground.shape, np.inf)
        weights[~foreground] = 0.1 + 0.9 * np.exp(-(d1[~foreground] ** 2) / (2.0 * 10.0**2))
        return weights
    if class_balance:
        total, count_fg = int(annotated.sum()), int((foreground & annotated).sum())
        for mask, count in ((foreground, count_fg), (~foreground, total - count_fg)):
            if count:
                weights[mask] = total / (2.0 * count)
    return weights


def _sampling(pixel_size):
    if pixel_size is None:
        return (1.0, 1.0)
    sizes = (pixel_size, pixel_size) if np.isscalar(pixel_size) else tuple(pixel_size)
    if len(sizes) != 2 or not all(np.isfinite(s) and s > 0 for s in sizes):
        raise ValueError(
            f"pixel_size: expected a positive number or (Y, X) pair, got {pixel_size!r}"
        )
    return tuple(float(s) for s in sizes)


def _check_weight_options(labels, w0, sigma, variant):
    if labels.ndim < 2:
        raise ValueError(f"labels: expected at least 2 axes (..., Y, X), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected integer instance ids, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels: expected non-negative ids, got minimum {labels.min()}")
    if not (np.isfinite(w0) and w0 >= 0):
        raise ValueError(f"w0: expected a non-negative number, got {w0!r}")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
