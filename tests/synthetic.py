"""Seeded synthetic fluorescence-like images of touching blobs, for training tests, and
probability maps of known shape, for the decoders."""

import numpy as np


def touching_blobs(seed: int, size: int = 128, pairs: int = 6, singles: int = 4):
    """Image (float32) and instance labels (int32) with ``pairs`` pairs of touching blobs.

    Each blob is a bright dome (intensity falls towards its rim), so touching blobs meet in a
    darker seam, as nuclei do.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = np.zeros((size, size), np.float32)
    labels = np.zeros((size, size), np.int32)
    next_id = 1
    placed = []
    for kind in ["pair"] * pairs + ["single"] * singles:
        for _ in range(100):
            r = rng.uniform(6, 10)
            cy, cx = rng.uniform(r + 2, size - 3 * r - 2), rng.uniform(r + 2, size - 3 * r - 2)
            angle = rng.uniform(0, 2 * np.pi)
            centres = [(cy, cx, r)]
            if kind == "pair":
                r2 = rng.uniform(6, 10)
                d = (r + r2) * 0.9  # overlapping discs -> touching objects
                centres.append((cy + d * np.sin(angle), cx + d * np.cos(angle), r2))
            if all(np.hypot(a - b, c - e) > p + q + 4 for a, c, p in centres for b, e, q in placed):
                break
        for cy, cx, r in centres:
            distance = np.hypot(yy - cy, xx - cx) / r
            dome = np.clip(1 - distance**2, 0, None) ** 0.5 * rng.uniform(0.6, 1.0)
            inside = (distance <= 1) & (dome > image)
            labels[inside] = next_id
            image = np.maximum(image, dome)
            next_id += 1
        placed.extend(centres)
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    return image, labels


def two_discs_and_a_neck(width: int) -> np.ndarray:
    """Probability 0.9 on two discs of radius 8 px centred at (15, 15) and (15, 34), joined by
    a horizontal bar ``width`` px high; 0.1 elsewhere. Shape (30, 50): mirror-symmetric about
    the line between columns 24 and 25."""
    probability = discs((30, 50), (15, 15, 8), (15, 34, 8))
    rows, cols = np.mgrid[:30, :50]
    probability[(abs(rows - 15) <= (width - 1) // 2) & (cols >= 15) & (cols <= 34)] = 0.9
    return probability


def discs(shape: tuple[int, int], *circles: tuple[float, float, float]) -> np.ndarray:
    """Probability 0.9 inside any of the ``circles`` (row, column, radius), 0.1 elsewhere."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    inside = np.zeros(shape, bool)
    for row, col, radius in circles:
        inside |= (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
    return np.where(inside, 0.9, 0.1).astype(np.float32)
