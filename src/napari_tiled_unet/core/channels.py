"""One rule for colour images, shared by the command line and the Segment widget.

A colour image (RGB or RGBA samples: tifffile's axis letter ``S``, or a napari RGB layer) given
to a one-channel model is segmented as grey, the mean of its red, green and blue, and the
user is told which axis was averaged and how to choose otherwise. A model that takes as many
channels as the image has colours sees them as its channels. Other channel axes (``C``) are
never averaged: a mismatch is an error that names the axis.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .io import LazyImage

COLOUR_AXIS = "S"  # tifffile's letter for colour samples
COLOURS = (3, 4)  # RGB, RGBA (alpha is left out of the grey)


class GreyView:
    """The grey of a colour image, averaged lazily: each read averages the red, green and blue
    of the pixels it asks for, so memory-mapped and dask inputs stay out of memory.

    Parameters
    ----------
    data : array-like, shape (..., colours, ...)
    axis : int
        The colour axis of ``data`` (3 or 4 entries).

    Attributes
    ----------
    shape : tuple of int
        ``data.shape`` without the colour axis.
    dtype : numpy.dtype
        float32.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, data: Any, axis: int):
        self.data, self.axis = data, axis % data.ndim
        self.shape = tuple(n for i, n in enumerate(data.shape) if i != self.axis)
        self.ndim = len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        full = key[: self.axis] + (slice(0, 3),) + key[self.axis :]
        # integer indices before the colour axis drop their axes from the result
        dropped = sum(isinstance(k, (int, np.integer)) for k in key[: self.axis])
        return np.asarray(self.data[full]).mean(axis=self.axis - dropped, dtype=np.float32)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        grey = self[...]
        return grey if dtype is None else grey.astype(dtype)


# how a command-line user chooses otherwise (the widget says it its own way)
CLI_OVERRIDE = "pass --channel-axis none to segment each colour as a plane"


def grey_message(axis: int, override: str = CLI_OVERRIDE) -> str:
    """What the user is told when colours were averaged: the axis, and how to choose otherwise."""
    return (
        f"image: the colours on axis {axis} (RGB) were averaged to grey for this one-channel "
        f"model; {override}"
    )


def fit_colours(
    image: LazyImage,
    in_channels: int,
    override: str = CLI_OVERRIDE,
) -> tuple[LazyImage, str | None]:
    """The image as a model with ``in_channels`` inputs sees it, by the rule above.

    Parameters
    ----------
    image : LazyImage
        From :func:`.io.open_image`, with the channel axis its metadata gives.
    in_channels : int
    override : str
        How the user chooses otherwise, for the message.

    Returns
    -------
    image : LazyImage
        Unchanged, or its grey (:class:`GreyView`) without the colour axis.
    message : str or None
        Said to the user when the colours were averaged.
    """
    axis = image.channel_axis
    if axis is None or in_channels != 1 or image.axes[axis] != COLOUR_AXIS:
        return image, None
    if image.shape[axis] not in COLOURS:
        return image, None
    axes = image.axes[:axis] + image.axes[axis + 1 :]
    return replace(image, data=GreyView(image.data, axis), axes=axes, channel_axis=None), (
        grey_message(axis, override)
    )
