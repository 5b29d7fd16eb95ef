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
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted: expected shape {truth.shape}, got {predicted.shape}")
    iou, n_pred, n_true = _iou_matrix(predicted, truth)
    pairs = np.argwhere(iou >= threshold)
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_p, used_t, tp = set(), set(), 0
    for p, t in pairs[order]:
        if p not in used_p and t not in used_t:
            used_p.add(p)
            used_t.add(t)
            tp += 1
    return ObjectScores(tp, n_pred - tp, n_true - tp)


def _iou_matrix(predicted, truth):
    """IoU between every predicted and every true object (ids compacted to 1..n)."""
    _, p = np.unique(predicted, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    p, t = p.reshape(predicted.shape), t.reshape(truth.shape)
    p_has_bg, t_has_bg = (predicted == 0).any(), (truth == 0).any()
    p = p + (0 if p_has_bg else 1)  # index 0 is background
    t = t + (0 if t_has_bg else 1)
    n_p, n_t = int(p.max()), int(t.max())
    overlap = np.bincount((p * (n_t + 1) + t).ravel(), minlength=(n_p + 1) * (n_t + 1))
    overlap = overlap.reshape(n_p + 1, n_t + 1)[1:, 1:].astype(np.float64)
    area_p = np.bincount(p.ravel(), minlength=n_p + 1)[1:]
    area_t = np.bincount(t.ravel(), minlength=n_t + 1)[1:]
    union = area_p[:, None] + area_t[None, :] - overlap
    return np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0), n_p, n_t


def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of distinct object ids that are 8-connected somewhere in ``labels`` (Y, X)."""
    labels = np.asarray(labels)
    pairs: set[tuple[int, int]] = set()
    height, width = labels.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = labels[dy:, max(dx, 0): width + min(dx, 0)]
        b = labels[: height - dy, max(-dx, 0): width - max(dx, 0)]
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
