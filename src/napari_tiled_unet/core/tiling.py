"""Overlap-tile plan, mirrored padding and exact stitching (pure numpy).

Exactness rests on two facts. (1) Every tile reads the same mirror-extended image as one big
forward pass would. (2) Every tile starts on the pooling grid (a multiple of ``2**depth`` from
the image origin), because 2x2 max pooling is only shift-equivariant for such shifts. Output
tiles may then overlap; overlapping pixels are written with identical values, so no blending is
needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product

import numpy as np


def mirror_indices(start: int, size: int, length: int) -> np.ndarray:
    """Source indices of ``size`` positions from ``start`` on an axis of ``length`` pixels,
    mirrored at the borders (edge pixel not repeated, like ``np.pad(mode="reflect")``) and
    repeated as often as needed when the window is larger than the axis.

    Returns
    -------
    numpy.ndarray of int64, shape (size,)
    """
    if length < 1:
        raise ValueError(f"length: expected at least 1 pixel, got {length}")
    index = np.arange(start, start + size, dtype=np.int64)
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index %= period
    return np.where(index >= length, period - index, index)


def mirror_pad(image: np.ndarray, before: tuple[int, int], after: tuple[int, int]) -> np.ndarray:
    """Mirror-pad the last two axes of ``image`` (any leading axes are kept).

    Parameters
    ----------
    image : numpy.ndarray, shape (..., Y, X)
    before, after : (int, int)
        Pixels added before and after along Y and X; may exceed the image size.

    Returns
    -------
    numpy.ndarray, shape (..., Y + before[0] + after[0], X + before[1] + after[1])
    """
    height, width = image.shape[-2:]
    rows = mirror_indices(-before[0], height + before[0] + after[0], height)
    cols = mirror_indices(-before[1], width + before[1] + after[1], width)
    return image[..., rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis.

    Attributes
    ----------
    length : int
        Image pixels along the axis.
    positions : tuple of int
        Start of each output tile, in image coordinates (multiples of the pooling step).
    output_size : int
        Output pixels each tile predicts (the last tile may reach past the image).
    input_size : int
        Input pixels each tile reads (output_size + 2 * context for valid models).
    context : int
        Pixels read before an output tile's first pixel.
    crop : int
        Offset of the output tile inside the network's output: 0 for valid models, ``context``
        for same-padded ones (whose output is as large as their input).
    offset : int
        Where the planned range starts in the source axis (0 unless only a block is planned).
    source_length : int
        Pixels of the source axis, where mirroring happens (``length`` unless a block).
    """

    length: int
    positions: tuple[int, ...]
    output_size: int
    input_size: int
    context: int
    crop: int
    offset: int = 0
    source_length: int = 0

    def source_indices(self, position: int) -> np.ndarray:
        """Mirrored source indices read by the tile whose output starts at ``position``."""
        return mirror_indices(
            self.offset + position - self.context,
            self.input_size,
            self.source_length or self.length,
        )


def plan_axis(
    length: int, input_size: int, model_geometry, span: tuple[int, int] | None = None
) -> AxisPlan:
    """Plan tiles of at most ``input_size`` input pixels covering ``length`` pixels.

    ``model_geometry`` answers ``output_size(s)``, ``legal_input_size(o)``, ``size_step``,
    ``context`` and ``margin`` (a :class:`~napari_tiled_unet.core.model.UNet` does). A tile
    larger than needed for the whole axis is shrunk to the smallest legal one that covers it.

    ``span=(start, stop)`` plans only that range of the axis (a block): tiles read the
    surrounding pixels as context and mirror only at the axis's own borders, so the block's
    output equals the same range of a whole-axis pass. ``start`` must be on the pooling grid.
    """
    if span is not None:
        start, stop = span
        if start % model_geometry.size_step or not 0 <= start < stop <= length:
            raise ValueError(
                f"block: expected 0 <= start < stop <= {length} with start a multiple "
                f"of {model_geometry.size_step}, got {start}:{stop}"
            )
        block = plan_axis(stop - start, input_size, model_geometry)
        return replace(block, offset=start, source_length=length)
    step = model_geometry.size_step
    context = model_geometry.context
    # A tile must predict at least one pooling step so that consecutive tiles can advance.
    floor_input = _input_for_output(model_geometry, step)
    whole_input = _input_for_output(model_geometry, length)
    size = min(max(int(input_size), floor_input), whole_input)
    size = _largest_legal_at_most(model_geometry, size, floor_input)
    output = _output_of(model_geometry, size)
    if output >= length:
        positions = [0]
    else:
        stride = output - output % step
        last = -(-(length - output) // step) * step
        positions = sorted(set(range(0, last, stride)) | {last})
    crop = context if model_geometry.margin == 0 else 0
    return AxisPlan(length, tuple(positions), output, size, context, crop)


def _input_for_output(geometry, output: int) -> int:
    if geometry.margin == 0:
        return max(1, output) + 2 * geometry.context
    return geometry.legal_input_size(output)


def _output_of(geometry, input_size: int) -> int:
    if geometry.margin == 0:
        return input_size - 2 * geometry.context
    return geometry.output_size(input_size)


def _largest_legal_at_most(geometry, size: int, floor: int) -> int:
    if geometry.margin == 0:
        return size
    while size > floor and geometry.output_size(size) is None:
        size -= 1
    return size


@dataclass(frozen=True)
class Tile:
    """One output tile: where it reads (mirrored source indices) and where it writes."""

    rows: np.ndarray
    cols: np.ndarray
    out_y: slice
    out_x: slice
    crop_y: slice
    crop_x: slice


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a (Y, X) plane; iterate to get :class:`Tile` objects in raster order."""

    y: AxisPlan
    x: AxisPlan

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.y.input_size, self.x.input_size

    def __len__(self) -> int:
        return len(self.y.positions) * len(self.x.positions)

    def __iter__(self):
        for py, px in product(self.y.positions, self.x.positions):
            out_y, crop_y = _write_window(self.y, py)
            out_x, crop_x = _write_window(self.x, px)
            yield Tile(
                self.y.source_indices(py), self.x.source_indices(px), out_y, out_x, crop_y, crop_x
            )


def _write_window(axis: AxisPlan, position: int) -> tuple[slice, slice]:
    stop = min(position + axis.output_size, axis.length)
    return slice(position, stop), slice(axis.crop, axis.crop + stop - position)


def plan_tiles(
    shape: tuple[int, int],
    tile: int | tuple[int, int],
    model_geometry,
    region: tuple[slice, slice] | None = None,
) -> TilePlan:
    """Plan overlap tiles for a plane of ``shape`` (Y, X) with input tiles of about ``tile``;
    with ``region`` (a (Y, X) pair of slices), for that block of the plane only (output
    coordinates then count from the block's corner)."""
    tile_y, tile_x = (tile, tile) if isinstance(tile, (int, np.integer)) else tile
    spans = (None, None) if region is None else [(s.start, s.stop) for s in region]
    return TilePlan(
        plan_axis(shape[0], tile_y, model_geometry, spans[0]),
        plan_axis(shape[1], tile_x, model_geometry, spans[1]),
    )
