"""Objects at the model's size: a lazily resampled view of an image, and the way back.

A model is trained on objects of a typical diameter (``metadata["diameter"]``). An image whose
objects are another size is segmented at a working scale ``factor = model diameter / object
diameter``: the engine reads :class:`Rescaled`, which resamples (linearly) only the pixels each
tile asks for, so memory stays bounded by tiles and the overlap-tile prediction stays exact at
the working scale (every working pixel is a fixed function of its coordinates). Labels go back
to the original grid by nearest neighbour, probabilities linearly.
"""

from __future__ import annotations

import math

import numpy as np

SMALLEST_FACTOR, LARGEST_FACTOR = 1 / 8, 8.0


def check_factor(factor: float) -> None:
    """Raise ValueError unless ``factor`` is within [1/8, 8]."""
    if not (SMALLEST_FACTOR <= factor <= LARGEST_FACTOR):
        raise ValueError(
            f"diameter: the scale factor must be within [{SMALLEST_FACTOR}, "
            f"{LARGEST_FACTOR}], got {factor:.3g}"
        )


def working_shape(length: int, factor: float) -> int:
    """Pixels along an axis of ``length`` pixels at the working scale."""
    return max(1, int(round(length * factor)))


def source_coordinates(indices: np.ndarray, factor: float, length: int) -> np.ndarray:
    """Source positions (float, clipped to the axis) of working-scale pixel ``indices``, with
    pixel centres aligned: ``(i + 0.5) / factor - 0.5``."""
    return np.clip((np.asarray(indices, np.float64) + 0.5) / factor - 0.5, 0, length - 1)


class Rescaled:
    """An image (..., Y, X) seen at ``factor`` times its size, resampled on access: linear
    interpolation when enlarging, the mean over each working pixel's footprint (area
    averaging) when shrinking.

    Supports what the engine and the normaliser ask of an array: ``shape``, ``dtype``, ``ndim``
    and indexing with integers and slices (steps included) on every axis.

    Parameters
    ----------
    image : array-like, shape (..., Y, X)
        numpy, memmap, zarr or dask; read block by block.
    factor : float
        Working size / original size, in [1/8, 8].
    """

    def __init__(self, image, factor: float):
        check_factor(factor)
        self.image, self.factor = image, float(factor)
        self.source_shape = tuple(image.shape)
        self.shape = self.source_shape[:-2] + tuple(
            working_shape(n, factor) for n in self.source_shape[-2:]
        )
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        # (source window and weights of an axis, resampling along it) for this direction
        self._weights, self._resample = (
            (_linear_weights, _interpolate) if factor >= 1.0 else (_footprints, _average)
        )

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        *lead, rows, cols = key
        (r0, r1, rw), (c0, c1, cw) = (self._axis(k, -2 + i) for i, k in enumerate((rows, cols)))
        block = np.asarray(self.image[tuple(lead) + (slice(r0, r1), slice(c0, c1))], np.float32)
        return self._resample(self._resample(block, rw, -2), cw, -1)

    def _axis(self, index, axis):
        """Source window and resampling weights for one working-scale axis index."""
        length, working = self.source_shape[axis], self.shape[axis]
        wanted = np.arange(working)[index]
        scalar = np.ndim(wanted) == 0
        return self._weights(np.atleast_1d(wanted), self.factor, length, scalar)


def _linear_weights(wanted: np.ndarray, factor: float, length: int, scalar: bool):
    """Source window and linear interpolation weights of working-scale pixels ``wanted``."""
    position = source_coordinates(wanted, factor, length)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, length - 1)
    start = int(low.min()) if wanted.size else 0
    stop = int(high.max()) + 1 if wanted.size else 0
    return start, stop, (low - start, high - start, (position - low).astype(np.float32), scalar)


def _interpolate(block: np.ndarray, weights, axis: int) -> np.ndarray:
    low, high, fraction, scalar = weights
    a, b = np.take(block, low, axis=axis), np.take(block, high, axis=axis)
    shape = [1] * block.ndim
    shape[axis] = -1
    out = a + (b - a) * fraction.reshape(shape)
    return np.squeeze(out, axis=axis) if scalar else out


def _footprints(wanted: np.ndarray, factor: float, length: int, scalar: bool):
    """Source window and area weights (a sparse working x window matrix) of working-scale
    pixels ``wanted``: pixel i covers source [i / factor, (i + 1) / factor), clipped to the
    axis; each source pixel weighs by its overlap with it."""
    from scipy import sparse

    if not wanted.size:
        return 0, 0, (sparse.csr_matrix((0, 0), dtype=np.float32), scalar)
    left = np.clip(wanted / factor, 0, length)
    right = np.clip((wanted + 1) / factor, 0, length)
    start, stop = int(np.floor(left.min())), int(np.ceil(right.max()))
    reach = int(np.ceil(1 / factor)) + 1  # source pixels one footprint can touch
    source = np.floor(left)[:, None].astype(np.int64) + np.arange(reach)
    overlap = np.minimum(right[:, None], source + 1) - np.maximum(left[:, None], source)
    weights = np.clip(overlap, 0, None) / (right - left)[:, None]
    rows = np.broadcast_to(np.arange(len(wanted))[:, None], source.shape)
    used = weights > 0
    matrix = sparse.csr_matrix(
        (weights[used].astype(np.float32), (rows[used], source[used] - start)),
        shape=(len(wanted), stop - start),
    )
    return start, stop, (matrix, scalar)


def _average(block: np.ndarray, weights, axis: int) -> np.ndarray:
    matrix, scalar = weights
    moved = np.moveaxis(block, axis, 0)
    flat = moved.reshape(moved.shape[0], int(np.prod(moved.shape[1:])))
    out = (matrix @ flat).astype(np.float32, copy=False)
    out = np.moveaxis(out.reshape((matrix.shape[0],) + moved.shape[1:]), 0, axis)
    return np.squeeze(out, axis=axis) if scalar else out


def back_to_original(
    labels: np.ndarray, probability: np.ndarray, shape: tuple[int, int], factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (nearest neighbour, ids renumbered 1..N in order) and probability (linear) of one
    working-scale plane, on the original (Y, X) grid ``shape``."""
    from skimage.segmentation import relabel_sequential

    rows = _nearest(shape[0], factor, labels.shape[0])
    cols = _nearest(shape[1], factor, labels.shape[1])
    original = labels[rows[:, None], cols[None, :]]
    original = relabel_sequential(original)[0].astype(np.uint32, copy=False)
    back = Rescaled(probability, 1.0 / factor)
    back.shape = tuple(shape)  # the original grid exactly (rounding could differ by a pixel)
    return original, back[:, :]


def _nearest(length: int, factor: float, working: int) -> np.ndarray:
    position = (np.arange(length) + 0.5) * factor - 0.5
    return np.clip(np.rint(position), 0, working - 1).astype(np.int64)


# Without a recorded size range, objects within 5% of the model's size are left as they are.
_SAME_SIZE = 0.05


def working_factor(metadata: dict, diameter: float) -> float:
    """The working-scale factor for objects of ``diameter`` px, from a model's ``metadata``.

    Objects larger than the model's typical diameter (``metadata["diameter"]``) are brought
    down to it: downsampling keeps what the network needs. Smaller objects are left as they
    are while the model was trained on objects that small (the low end of
    ``metadata["diameter_range"]``, :func:`~.metrics.diameter_range`): upsampling only blurs
    them into a look the network has not seen. Smaller still, they are brought up to that low
    end, no further (without a recorded range: up to the model's diameter).
    """
    factor = factor_for(metadata.get("diameter"), diameter)
    low = (metadata.get("diameter_range") or (math.inf,))[0]
    if factor > 1.0 and math.isfinite(low):
        # the least blur that makes them familiar: bringing 8 px nuclei up to the median
        # size (2.4x) doubled the false objects on training images of tiny nuclei
        factor = max(low / diameter, 1.0)
    return 1.0 if abs(factor - 1.0) <= _SAME_SIZE else factor


def factor_for(model_diameter: float | None, diameter: float) -> float:
    """The working-scale factor that brings objects of ``diameter`` px to the model's size."""
    if not model_diameter:
        raise ValueError(
            "diameter: this model records no training object diameter; segment at "
            "its own scale (no diameter) or retrain it with this version"
        )
    if (
        isinstance(diameter, bool)
        or not isinstance(diameter, (int, float))
        or not math.isfinite(diameter)
        or diameter <= 0
    ):
        raise ValueError(
            f"diameter: expected a positive number of pixels or 'auto', got {diameter!r}"
        )
    return float(model_diameter) / float(diameter)
