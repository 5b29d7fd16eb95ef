"""Segmentation metrics: pixel IoU and object matching (F1, AP at an IoU threshold).

AP follows the 2018 Data Science Bowl: ``TP / (TP + FP + FN)`` with objects matched one-to-one
when their IoU reaches the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pixel_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of the foreground masks (``> 0``); 1.0 when both are empty."""
    predicted, truth = np.asarray(predicted) > 0, np.asarray(truth) > 0
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)


@dataclass(frozen=True)
class ObjectScores:
    """Object matching at one IoU threshold."""

    tp: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        total = 2 * self.tp + self.fp + self.fn
        return 1.0 if total == 0 else 2 * self.tp / total

    @property
    def ap(self) -> float:
        total = self.tp + self.fp + self.fn
        return 1.0 if total == 0 else self.tp / total


def match_objects(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> ObjectScores:
    """Count true positives (pairs with IoU >= threshold, one-to-one), false positives and false
    negatives between two instance label images of the same shape.

    For ``threshold >= 0.5`` a match is unique by construction (two objects cannot both overlap
    one object by more than half); below that, pairs are taken greedily by decreasing IoU.
    """
    (scores,) = match_subsets(predicted, truth, [None], threshold)
    return scores


def match_subsets(
    predicted: np.ndarray, truth: np.ndarray, subsets, threshold: float = 0.5
) -> list[ObjectScores]:
    """:func:`match_objects` of ``predicted`` restricted to each of ``subsets``, with the
    overlaps counted once (the costly part): scoring post-processing that only drops objects.

    Parameters
    ----------
    predicted, truth : numpy.ndarray, shape (Y, X)
        Instance labels.
    subsets : sequence of (numpy.ndarray of bool, shape (predicted.max() + 1,)) or None
        Which predicted ids are kept (indexed by id); None: all of them.
    threshold : float

    Returns
    -------
    list of ObjectScores, one per subset
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted: expected shape {truth.shape}, got {predicted.shape}")
    pairs, iou, ids, n_true = _overlapping_pairs(predicted, truth)
    matchable = iou >= threshold
    pairs, iou = pairs[matchable], iou[matchable]
    pairs = pairs[np.argsort(-iou, kind="stable")]
    results = []
    for keep in subsets:
        kept = np.ones(ids.size, bool) if keep is None else np.asarray(keep)[ids]
        kept[0] = False  # background
        tp = _greedy_matches(pairs[kept[pairs[:, 0]]])
        results.append(ObjectScores(tp, int(kept.sum()) - tp, n_true - tp))
    return results


def _greedy_matches(pairs: np.ndarray) -> int:
    """One-to-one matches taken in the order of ``pairs`` (predicted, true): their count."""
    used_p, used_t, tp = set(), set(), 0
    for p, t in pairs.tolist():
        if p not in used_p and t not in used_t:
            used_p.add(p)
            used_t.add(t)
            tp += 1
    return tp


def _overlapping_pairs(predicted, truth):
    """The (predicted, true) object pairs that overlap, with their IoU; ids compacted to 1..n.

    Only overlapping pairs are listed, so memory grows with the pixels and the objects, not
    with the product of the object counts (12,000 objects a side would need 1 GB as a matrix).

    Returns
    -------
    pairs : numpy.ndarray of int64, shape (K, 2)
    iou : numpy.ndarray of float64, shape (K,)
    ids : numpy.ndarray, shape (n_pred + 1,)
        The predicted id of each compacted id (0: background).
    n_true : int
    """
    p_ids, p = np.unique(predicted, return_inverse=True)
    t_ids, t = np.unique(truth, return_inverse=True)
    p, t = p.reshape(-1) + (p_ids[0] != 0), t.reshape(-1) + (t_ids[0] != 0)  # 0 = background
    n_p, n_t = len(p_ids) - (p_ids[0] == 0), len(t_ids) - (t_ids[0] == 0)
    both = (p > 0) & (t > 0)
    keys, overlap = np.unique(p[both].astype(np.int64) * (n_t + 1) + t[both], return_counts=True)
    pairs = np.stack([keys // (n_t + 1), keys % (n_t + 1)], axis=1)
    area_p = np.bincount(p, minlength=n_p + 1)
    area_t = np.bincount(t, minlength=n_t + 1)
    union = area_p[pairs[:, 0]] + area_t[pairs[:, 1]] - overlap
    ids = p_ids if p_ids[0] == 0 else np.concatenate([[0], p_ids])
    return pairs, overlap / union, ids, int(n_t)


def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of distinct object ids that are 8-connected somewhere in ``labels`` (Y, X)."""
    labels = np.asarray(labels)
    pairs: set[tuple[int, int]] = set()
    height, width = labels.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = labels[dy:, max(dx, 0) : width + min(dx, 0)]
        b = labels[: height - dy, max(-dx, 0) : width - max(dx, 0)]
        both = (a > 0) & (b > 0) & (a != b)
        pairs |= {(min(p, q), max(p, q)) for p, q in zip(a[both].tolist(), b[both].tolist())}
    return pairs


def split_touching_pairs(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """How many touching ground-truth pairs the prediction splits, of how many.

    A pair is split when its two objects are each covered mostly by a predicted object, and by
    two different ones.

    Returns
    -------
    (split, total) : (int, int)
    """
    pairs = touching_pairs(truth)
    if not pairs:
        return 0, 0
    majority = {}
    for obj in {o for pair in pairs for o in pair}:
        covered, counts = np.unique(np.asarray(predicted)[truth == obj], return_counts=True)
        majority[obj] = covered[np.argmax(counts)]
    split = sum(1 for a, b in pairs if majority[a] and majority[b] and majority[a] != majority[b])
    return split, len(pairs)


def diameter_range(
    label_planes, zoom: tuple[float, float] = (1.0, 1.0), percentiles=(10, 90)
) -> tuple[float, float]:
    """The object sizes a model trained on ``label_planes`` has seen often: the ``percentiles``
    of the planes' median equivalent diameters (px), each plane seen at zooms spread
    log-uniformly over ``zoom`` (the training's scale augmentation).

    Parameters
    ----------
    label_planes : iterable of ndarray, each shape (Y, X)
        Instance labels, 0 = background; planes without objects are skipped.
    zoom : (float, float)
        Smallest and largest augmentation zoom.

    Returns
    -------
    (float, float)
        Low and high diameter in px; (0.0, 0.0) when no plane holds an object.
    """
    medians = np.array([median_diameter([plane]) for plane in label_planes])
    medians = medians[medians > 0]
    if not medians.size:
        return 0.0, 0.0
    zooms = np.exp(np.linspace(np.log(zoom[0]), np.log(zoom[1]), 9 if zoom[1] > zoom[0] else 1))
    seen = (medians[:, None] * zooms[None, :]).ravel()
    low, high = np.percentile(seen, percentiles)
    return round(float(low), 2), round(float(high), 2)


def median_diameter(label_planes) -> float:
    """Median equivalent diameter ``sqrt(4 area / pi)`` in pixels of the objects in
    ``label_planes`` (each shape (Y, X), 0 = background); 0.0 when there are none."""
    counts = [np.unique(labels[labels > 0], return_counts=True)[1] for labels in label_planes]
    areas = np.concatenate(counts) if counts else np.zeros(0)
    return float(np.sqrt(4 * np.median(areas) / np.pi)) if areas.size else 0.0
