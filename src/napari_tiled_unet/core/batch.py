"""Segmenting files: an image file in, a labels TIFF (with probabilities and a measurements CSV
when asked for) out, written plane by plane and atomically.

The one file loop that the command line and the Segment widget's folder mode both drain.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import LazyImage, TiffStreams, release_mapped_pages
from .measure import MeasurementTable
from .postprocess import ZLinker, labels_dtype, postprocess_options
from .segment import SegmentEvent
from .shapes import normalised_axis, output_shape, without_channel

TIFF_SUFFIXES = (".tif", ".tiff")


def batch_pairs(inputs: Sequence[Path], output_folder: Path) -> list[tuple[Path, Path]]:
    """Each input image (files, or the ``.tif``/``.tiff`` files of folders) with its labels
    file ``NAME_labels.tif`` in ``output_folder``; checked before any work.

    Raises
    ------
    ValueError
        A folder holds no TIFF, two inputs share a name, or ``output_folder`` is a file.
    """
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()
            )
            if not found:
                raise ValueError(f"input: folder {path} holds no .tif or .tiff file")
            files += found
        else:
            files.append(path)
    output_folder = Path(output_folder)
    if output_folder.exists() and not output_folder.is_dir():
        raise ValueError(
            f"output: with several inputs, expected a folder, got the file {output_folder}"
        )
    if len({f.stem for f in files}) != len(files):
        raise ValueError("input: two inputs share a name; their outputs would collide")
    pairs = [(f, output_folder / f"{f.stem}_labels.tif") for f in files]
    taken = {f.resolve() for f in files} & {out.resolve() for _, out in pairs}
    if taken:
        raise ValueError(
            f"output: {sorted(taken)[0]} is an input of this run; choose another output folder"
        )
    return pairs


def check_output_path(option: str, path: Path, inputs, overwrite: bool, suffixes=None) -> None:
    """Refuse (ValueError naming ``option``), before any work, an output that cannot be written or must not be: a folder, a
    wrong file type, one of the run's inputs (links and hard links resolved), an existing file
    without ``--overwrite``, a missing or read-only folder."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(
            f"{option}: expected a file name ending in {' or '.join(suffixes)}, got {path}"
        )
    if path.is_dir():
        raise ValueError(f"{option}: {path} is a folder; expected a file name")
    for source in inputs:
        if (
            source is not None
            and path.exists()
            and Path(source).exists()
            and os.path.samefile(path, source)
        ):
            raise ValueError(
                f"{option}: {path} is one of this run's inputs ({source}); choose another output"
            )
    if path.exists() and not overwrite:
        raise ValueError(f"{option}: {path} exists; pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{option}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: folder {folder} is not writable")


def labels_dtype_for(shape: Sequence[int], min_size: int, planes: int = 1) -> np.dtype:
    """The dtype of a labels file, fixed before the first plane is labelled.

    Ids are bounded by the number of disjoint objects of at least ``min_size`` pixels that fit
    in a plane (in ``planes`` planes, when ids run through the stack).
    """
    height, width = shape[-2:]
    return labels_dtype(planes * (height * width // max(min_size, 1)))


def z_linker(min_iou: float | None, axes: str) -> ZLinker | None:
    """A :class:`ZLinker` for a stack of ``axes`` (channel excluded), or None without
    ``min_iou``; the plane axis just before Y, X must be Z."""
    if min_iou is None:
        return None
    if len(axes) < 3 or axes[-3] != "Z":
        raise ValueError(
            f"link_z: expected a stack whose plane axis just before Y, X is Z, got axes {axes!r}"
        )
    return ZLinker(min_iou)


@dataclass(frozen=True)
class FileOutputs:
    """Where one input's results go: labels TIFF, and optionally probabilities and a CSV."""

    labels: Path
    probabilities: Path | None = None
    table: Path | None = None


@dataclass(frozen=True)
class FileEvent:
    """Progress of :func:`segment_file`.

    Attributes
    ----------
    step : SegmentEvent
        The segment step's latest event (tiles, planes, diameter).
    planes : int
        Planes written so far.
    objects : int
        Objects found, summed over the planes.
    linked : int or None
        Objects after linking across Z (``link_z``), else None.
    stopped : bool
        The run was stopped: nothing was written.
    written : bool
        Last event: every output has its name.
    """

    step: SegmentEvent
    planes: int
    objects: int
    linked: int | None = None
    stopped: bool = False
    written: bool = False


def segment_file(
    model,
    image: LazyImage,
    outputs: FileOutputs,
    *,
    channel_axis: int | None = None,
    link_z: float | None = None,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
    **options,
) -> Iterator[FileEvent]:
    """Segment one opened image file into ``outputs``; returns a generator of events.

    Arguments are checked when this function is called, before any work. Planes stream from
    the segment step to the files (memory holds a few planes); the files are committed
    together when the last plane is written, and a stopped run writes nothing.

    Parameters
    ----------
    model : torch.nn.Module
    image : LazyImage
        From :func:`.io.open_image`; shape (..., [C,] Y, X).
    outputs : FileOutputs
    channel_axis : int or None
        Axis of ``image`` holding channels.
    link_z : float or None
        Link objects across Z planes at this IoU (:class:`.postprocess.ZLinker`).
    overwrite : bool
        Replace outputs that exist when they are committed.
    should_stop : callable, optional
    **options
        Passed on to :func:`.segment.segment` (threshold, min_size, tile, batch, device, ...).
    """
    from .segment import segment

    channel_axis = normalised_axis(channel_axis, len(image.shape))
    axes = "".join(without_channel(image.axes, channel_axis))
    shape = output_shape(image.shape, channel_axis)
    linker = z_linker(link_z, axes)
    events = segment(
        model, image.data, channel_axis=channel_axis, should_stop=should_stop, **options
    )
    min_size = postprocess_options(model.metadata, min_size=options.get("min_size")).min_size
    planes = int(np.prod(shape[:-2], dtype=np.int64)) if linker else 1
    # Labels compress many times over, which matters when their dtype must be wide.
    targets: list[tuple] = [
        (outputs.labels, shape, labels_dtype_for(shape, min_size, planes), axes, True)
    ]
    if outputs.probabilities is not None:
        targets.append((outputs.probabilities, shape, np.float32, axes, False))
    table = (
        None if outputs.table is None else MeasurementTable(image.data, channel_axis, outputs.table)
    )
    return _written(events, targets, linker, table, overwrite, image.data)


def _written(events, targets, linker, table, overwrite, data) -> Iterator[FileEvent]:
    planes = objects = 0
    with contextlib.closing(events), TiffStreams(targets, overwrite) as streams:
        try:
            for event in events:
                linked = None if linker is None else linker.next_id - 1
                if event.stopped:
                    yield FileEvent(event, planes, objects, linked, stopped=True)
                    return
                for plane in event.planes:
                    labels = plane.labels
                    if linker is not None:
                        labels = linker.link(labels, new_stack=plane.lead[-1] == 0)
                    if table is not None:
                        table.add(plane.index, plane.lead, labels)
                    streams.put((labels, plane.probability))
                    release_mapped_pages(data)
                    planes, objects = planes + 1, objects + plane.count
                linked = None if linker is None else linker.next_id - 1
                yield FileEvent(event, planes, objects, linked)
            streams.commit()
            if table is not None:
                table.commit()
            yield FileEvent(event, planes, objects, linked, written=True)
        finally:
            if table is not None:
                table.discard()
