"""Lazy TIFF reading and streaming, atomic TIFF writing.

Reading never loads a stack: an uncompressed contiguous series is memory-mapped, anything else
is read through tifffile's zarr store, chunk by chunk. Axes come from OME / ImageJ / tifffile
metadata and are reordered (lazily) so that Y and X are the last two axes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHANNEL_AXES = "CS"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BIGTIFF_BYTES = 2**32 - 2**25  # classic TIFF offsets are 32-bit; leave room for headers


@dataclass
class LazyImage:
    """A TIFF series opened lazily.

    Attributes
    ----------
    data : array-like, shape (..., Y, X)
        numpy memmap, or a dask array over tifffile's zarr store.
    axes : str
        One letter per axis of ``data`` (tifffile's letters; Y and X last).
    channel_axis : int or None
        Index of the channel axis ('C' or RGB samples 'S') in ``data``.
    """

    data: object
    axes: str
    channel_axis: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)


def read_tiff(path, name: str = "input") -> LazyImage:
    """Open the first series of a TIFF file lazily and check it is complete.

    Parameters
    ----------
    path : str or Path
    name : str
        Parameter name used in error messages.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a TIFF, truncated, or without Y and X axes.
    """
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic not in _TIFF_MAGIC:
        raise ValueError(f"{name}: expected a TIFF file, got {path} (starts with {magic!r})")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
            _check_complete(series, path, name)
            contiguous = series.dataoffset is not None
    except Exception as error:  # tifffile raises many types for damaged files
        if isinstance(error, ValueError) and str(error).startswith(f"{name}:"):
            raise
        raise ValueError(f"{name}: TIFF file is truncated or damaged: {path} ({error})") from None
    if contiguous:
        data = tifffile.memmap(path, series=0, mode="r")
    else:
        data = _zarr_view(path)
    return _yx_last(data.reshape(shape) if data.shape != shape else data, axes, path, name)


def _check_complete(series, path, name):
    size = path.stat().st_size
    end = series.dataoffset + series.nbytes if series.dataoffset is not None else 0
    for page in series.pages:
        if page is None:
            continue
        if 0 in page.databytecounts:
            end = size + 1
        end = max([end] + [o + n for o, n in zip(page.dataoffsets, page.databytecounts)])
    if end > size:
        raise ValueError(
            f"{name}: TIFF file is truncated or damaged: {path} (image data needs {end} bytes, "
            f"file has {size})"
        )


def _zarr_view(path):
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=0)
    return da.from_zarr(zarr.open(store, mode="r"))


def _yx_last(data, axes: str, path, name) -> LazyImage:
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{name}: expected an image with Y and X axes, got axes {axes!r} in {path}")
    order = [i for i, a in enumerate(axes) if a not in "YX"] + [axes.index("Y"), axes.index("X")]
    if order != list(range(len(axes))):
        data = data.transpose(order)
        axes = "".join(axes[i] for i in order)
    channel = next((i for i, a in enumerate(axes) if a in CHANNEL_AXES), None)
    return LazyImage(data, axes, channel)


def release_mapped_pages(data) -> None:
    """Let the OS drop this process's resident pages of a memory-mapped input.

    Pages of a file mapping count in the process's RSS once read; streaming a stack through a
    memmap would otherwise "grow" RSS to the stack's size although nothing holds the data.
    Pages read again later come back from the page cache. No-op for other arrays.
    """
    import mmap

    mapping = getattr(data, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class IncompleteWrite(RuntimeError):
    """The plane source ended early (cancelled); nothing was written at the target path."""


def write_tiff_stream(path, shape, dtype, axes: str | None, planes, compress: bool = False) -> Path:
    """Write a stack plane by plane, atomically.

    Planes are pulled from ``planes`` one at a time, so memory holds one plane. The data goes to
    a temporary file beside ``path`` that is renamed over ``path`` only when every plane has
    been written; if ``planes`` raises or ends early, the temporary file is removed and
    ``path`` is untouched. BigTIFF is used when the stack exceeds classic TIFF's 4 GB.

    Parameters
    ----------
    path : str or Path
    shape : tuple of int
        Full shape (..., Y, X).
    dtype : numpy dtype
    axes : str or None
        Axis letters, one per entry of ``shape``, stored as metadata.
    planes : iterable of numpy.ndarray, each shape (Y, X)
    compress : bool
        zlib (level 1) per plane: fast, and label images shrink many times.

    Raises
    ------
    IncompleteWrite
        ``planes`` ended before the stack was complete.
    """
    import tifffile

    path = Path(path)
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    expected = int(np.prod(shape[:-2], dtype=np.int64))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        with tifffile.TiffWriter(tmp, bigtiff=nbytes >= _BIGTIFF_BYTES) as writer:
            writer.write(
                _checked_planes(planes, shape[-2:], dtype, expected),
                shape=shape, dtype=dtype, photometric="minisblack",
                metadata={"axes": axes} if axes else {},
                compression="zlib" if compress else None,
                compressionargs={"level": 1} if compress else None,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _checked_planes(planes, plane_shape, dtype, expected):
    count = 0
    for plane in planes:
        plane = np.asarray(plane)
        if plane.shape != tuple(plane_shape):
            raise ValueError(f"plane {count}: expected shape {tuple(plane_shape)}, got {plane.shape}")
        yield plane.astype(dtype, copy=False)
        count += 1
    if count != expected:
        raise IncompleteWrite(f"got {count} planes of {expected}; nothing was written")


_END = object()


def write_tiff_streams(targets, rows) -> list[Path]:
    """Write several stacks in lockstep, each atomically, pulling one row of planes at a time.

    Parameters
    ----------
    targets : list of (path, shape, dtype, axes, compress)
        One entry per file, as the arguments of :func:`write_tiff_stream`.
    rows : iterable of tuples of numpy.ndarray
        The k-th plane of every file, in the order of ``targets``.

    Returns
    -------
    list of Path
    """
    import queue
    import threading

    if len(targets) == 1:
        return [_write_target(targets[0], (row[0] for row in rows))]
    handoffs = [queue.Queue(maxsize=1) for _ in targets[1:]]
    errors: list[BaseException] = []

    def side_writer(target, handoff):
        planes = _until_end(handoff)
        try:
            _write_target(target, planes)
        except BaseException as error:  # reported on the main thread below
            errors.append(error)
            for _ in planes:  # keep the producer from blocking on a full hand-off
                pass

    threads = [threading.Thread(target=side_writer, args=(t, h), daemon=True)
               for t, h in zip(targets[1:], handoffs)]
    for thread in threads:
        thread.start()

    def first_planes():
        try:
            for row in rows:
                for handoff, plane in zip(handoffs, row[1:]):
                    handoff.put(plane)
                yield row[0]
        finally:
            for handoff in handoffs:
                handoff.put(_END)

    try:
        written = [_write_target(targets[0], first_planes())]
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return written + [Path(t[0]) for t in targets[1:]]


def _write_target(target, planes) -> Path:
    path, shape, dtype, axes, *compress = target
    return write_tiff_stream(path, shape, dtype, axes, planes, *compress)


def _until_end(handoff):
    while (item := handoff.get()) is not _END:
        yield item
