"""Input normalisation stored in model files and applied identically at training and inference.

Statistics are taken per plane and per channel (never per tile: that would break exact
stitching), on a strided subsample so that huge planes are not read whole.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MODES = ("percentile", "none")
_SAMPLE_PIXELS = 1 << 20


@dataclass(frozen=True)
class Normalization:
    """Per-plane, per-channel percentile scaling: ``(x - p_low) / (p_high - p_low)``.

    Parameters
    ----------
    mode : {"percentile", "none"}
    low, high : float
        Percentiles mapped to 0 and 1.
    """

    mode: str = "percentile"
    low: float = 1.0
    high: float = 99.8

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"normalization mode: expected one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(
                f"normalization percentiles: expected 0 <= low < high <= 100, "
                f"got low={self.low}, high={self.high}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> Normalization:
        return cls(**values) if values else cls(mode="none")

    def plane_stats(self, plane) -> tuple[np.ndarray, np.ndarray]:
        """Offset and scale per channel for one plane.

        Parameters
        ----------
        plane : array-like, shape (C, Y, X)

        Returns
        -------
        offset, scale : numpy.ndarray of float32, shape (C, 1, 1)
        """
        channels = plane.shape[0]
        if self.mode == "none":
            return np.zeros((channels, 1, 1), np.float32), np.ones((channels, 1, 1), np.float32)
        step = max(1, math.ceil(math.sqrt(plane.shape[1] * plane.shape[2] / _SAMPLE_PIXELS)))
        sample = _strided_sample(plane, step).reshape(channels, -1)
        low, high = np.stack([_percentiles(values, (self.low, self.high)) for values in sample], 1)
        spread = high - low
        # A constant channel keeps its values rather than being divided by zero.
        scale = np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 1.0)
        return (
            low.reshape(-1, 1, 1).astype(np.float32),
            scale.reshape(-1, 1, 1).astype(np.float32),
        )


_SAMPLE_ROWS = 64


def _strided_sample(plane, step: int) -> np.ndarray:
    """``plane[:, ::step, ::step]``, read a few rows at a time. A plane that can drop the pages
    it mapped (``release_pages``, a memmapped file) drops them after each read: sampled rows
    of a huge plane would otherwise map most of the file (the kernel maps pages around each
    touched one), a plane's worth of resident memory."""
    parts = []
    for start in range(0, plane.shape[1], step * _SAMPLE_ROWS):
        # a copy: a memmap view would only be read later, after its pages were dropped
        parts.append(
            np.array(plane[:, start : start + step * _SAMPLE_ROWS : step, ::step], copy=True)
        )
        if hasattr(plane, "release_pages"):
            plane.release_pages()
    return np.concatenate(parts, axis=1)


def _percentiles(values: np.ndarray, percents) -> np.ndarray:
    """``np.percentile(values, percents)`` (linear interpolation), from a histogram for 8- and
    16-bit integers: the same numbers, without sorting a million pixels per plane."""
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2:
        low = int(values.min())
        counts = np.cumsum(np.bincount((values.astype(np.int32) - low).ravel()))
        position = np.asarray(percents, np.float64) / 100.0 * (values.size - 1)
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, values.size - 1)
        # the k-th smallest value (0-based) is the first bin whose cumulative count exceeds k
        lower = np.searchsorted(counts, below, side="right") + low
        upper = np.searchsorted(counts, above, side="right") + low
        fraction = position - below
        # numpy's lerp: from the nearer end, so the two agree to the last bit or two
        return np.where(
            fraction >= 0.5,
            upper - (upper - lower) * (1 - fraction),
            lower + (upper - lower) * fraction,
        )
    return np.percentile(values.astype(np.float64), percents)
