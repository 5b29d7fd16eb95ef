"""The one home of the shape arithmetic around a channel axis (no torch): which axes are planes,
what an output without the channel axis looks like, and how a channel axis is checked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def normalised_axis(axis: int | None, ndim: int) -> int | None:
    """``axis`` as a non-negative index of an array of ``ndim`` axes (None stays None).

    Raises
    ------
    ValueError
        ``axis`` is not an integer in [-ndim, ndim).
    """
    if axis is None:
        return None
    if (
        isinstance(axis, bool)
        or not isinstance(axis, (int, np.integer))
        or not -ndim <= axis < ndim
    ):
        raise ValueError(
            f"channel_axis: expected an axis index in [{-ndim}, {ndim - 1}], got {axis!r}"
        )
    return int(axis) % ndim


def without_channel(items: Sequence[T], channel_axis: int | None) -> tuple[T, ...]:
    """``items`` (a shape, or axis letters) without the entry of the channel axis.

    Parameters
    ----------
    items : sequence, one entry per axis of the image
    channel_axis : int or None
        Checked against ``len(items)``.
    """
    axis = normalised_axis(channel_axis, len(items))
    return tuple(item for i, item in enumerate(items) if i != axis)


def output_shape(shape: Sequence[int], channel_axis: int | None) -> tuple[int, ...]:
    """The shape of a per-pixel result (labels, probability) of an image of ``shape``:
    (..., Y, X) without the channel axis."""
    return tuple(int(n) for n in without_channel(shape, channel_axis))


def leading_shape(shape: Sequence[int], channel_axis: int | None) -> tuple[int, ...]:
    """The plane axes of an image of ``shape``: every axis before (Y, X) but the channel axis.

    Raises
    ------
    ValueError
        ``channel_axis`` is not an axis of ``shape``.
    """
    axis = normalised_axis(channel_axis, len(shape))
    return tuple(int(n) for i, n in enumerate(shape[:-2]) if i != axis)
