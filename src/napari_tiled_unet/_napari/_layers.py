"""Layers to arrays and back: what the widgets hand to the core and how results are placed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    """Where a result computed from an image layer goes in world space (channel axis removed).

    Attributes
    ----------
    scale, translate : tuple of float, one per result axis
    axis_labels : tuple of str or None
    """

    scale: tuple
    translate: tuple
    axis_labels: tuple | None

    @classmethod
    def of(cls, layer, channel_axis: int | None) -> Placement:
        """The placement of ``layer``'s spatial axes (RGB layers have no channel entry)."""
        keep = [i for i in range(layer.ndim) if layer.rgb or i != channel_axis]
        labels = getattr(layer, "axis_labels", None)
        return cls(
            scale=tuple(float(layer.scale[i]) for i in keep),
            translate=tuple(float(layer.translate[i]) for i in keep),
            axis_labels=None if labels is None else tuple(labels[i] for i in keep),
        )

    def layer_kwargs(self) -> dict:
        kwargs = {"scale": self.scale, "translate": self.translate}
        if self.axis_labels is not None:
            kwargs["axis_labels"] = self.axis_labels
        return kwargs


def full_resolution(layer):
    """The layer's data at full resolution (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


def is_lazy(data) -> bool:
    """True for dask, zarr and other out-of-memory arrays (results then go to a zarr store)."""
    return not isinstance(data, np.ndarray)


def model_input(layer, choice: str, in_channels: int) -> tuple[object, int | None]:
    """The layer's data as the model's input, and its channel axis.

    Parameters
    ----------
    layer : napari.layers.Image
    choice : str
        "auto", "none" or an axis number (as text).
    in_channels : int
        Channels the model expects.

    Returns
    -------
    data : array-like, shape (..., Y, X) or with a channel axis before Y, X
    channel_axis : int or None
    """
    data = full_resolution(layer)
    if layer.rgb:
        return _rgb_input(data, in_channels)
    if data.ndim < 2 or min(data.shape[-2:]) == 0:
        raise ValueError(
            f"image: expected a non-empty image of at least 2 dimensions, got shape "
            f"{tuple(data.shape)} in layer {layer.name!r}"
        )
    axis = _channel_axis(data.shape, choice, in_channels, layer.name)
    return data, axis


def _rgb_input(data, in_channels: int):
    from ..core.channels import GreyView

    colours = data.shape[-1]
    if in_channels == 1:
        # the one colour rule of core.channels, as the command line applies it
        return GreyView(data, -1), None
    if in_channels != colours:
        raise ValueError(
            f"image: the model expects {in_channels} channels, the RGB layer has {colours}"
        )
    return np.moveaxis(data, -1, -3), data.ndim - 3


def _channel_axis(shape, choice: str, in_channels: int, name: str) -> int | None:
    if choice == "none":
        return None
    if choice != "auto":
        axis = int(choice)
        if not 0 <= axis < len(shape) - 2:
            raise ValueError(
                f"channel axis: expected an axis before Y, X (0..{len(shape) - 3}), got {axis}"
            )
        return axis
    if in_channels == 1:
        return None
    matches = [i for i in range(len(shape) - 2) if shape[i] == in_channels]
    if len(matches) != 1:
        found = "none" if not matches else f"axes {matches}"
        raise ValueError(
            f"channel axis: the model expects {in_channels} channels; in layer {name!r} of shape "
            f"{tuple(shape)} {found} of that size: choose the channel axis"
        )
    return matches[0]


def colour_message(layer, in_channels: int) -> str | None:
    """What the user is told when an RGB layer is averaged to grey for the model."""
    from ..core.channels import grey_message

    if not layer.rgb or in_channels != 1:
        return None
    return grey_message(
        layer.ndim, "open the image as separate channels (not RGB) to segment each colour"
    )


def current_plane_index(layer, point, channel_axis: int | None) -> tuple[int, ...]:
    """Indices along the layer's leading (non-channel, non-Y/X) axes at the viewer's ``point``."""
    data_point = np.asarray(layer.world_to_data(point), dtype=float)
    shape = full_resolution(layer).shape
    leading = [i for i in range(layer.ndim - 2) if layer.rgb or i != channel_axis]
    return tuple(int(np.clip(np.round(data_point[i]), 0, shape[i] - 1)) for i in leading)


def plane_of(data, index: tuple[int, ...], channel_axis: int | None):
    """The (Y, X) plane (with its channel axis) at leading ``index``; returns (plane, channel_axis)."""
    key, leading, new_axis = [], iter(index), channel_axis
    for axis in range(data.ndim - 2):
        if axis == channel_axis:
            key.append(slice(None))
        else:
            key.append(next(leading))
            if channel_axis is not None and axis < channel_axis:
                new_axis -= 1
    return data[tuple(key)], new_axis
