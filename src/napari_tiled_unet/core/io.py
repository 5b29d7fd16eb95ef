"""Lazy TIFF reading and streaming, atomic TIFF writing.

Reading never loads a stack: an uncompressed contiguous series is memory-mapped, anything else
is read through tifffile's zarr store, chunk by chunk. Axes come from OME / ImageJ / tifffile
metadata and are reordered (lazily) so that Y and X are the last two axes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHANNEL_AXES = "CS"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BIGTIFF_BYTES = 2**32 - 2**25
_COMPRESS_THREADS = max(
    1, min(4, os.cpu_count() or 1)
)  # classic TIFF offsets are 32-bit; leave room for headers


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

    data: Any
    axes: str
    channel_axis: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)


def read_tiff(path, name: str = "input", series: int | None = None) -> LazyImage:
    """Open one image series of a TIFF file lazily (its full-resolution level) and check it is
    complete.

    Parameters
    ----------
    path : str or Path
    name : str
        Parameter name used in error messages.
    series : int, optional
        Which series of a file that holds several (OME multi-series, pages of different shapes).
        Required then: reading one silently would leave the rest out. Pyramids (OME SubIFDs)
        are read at level 0.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a TIFF, truncated, or without Y and X axes.
    """
    import tifffile

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a folder; expected a TIFF file")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic not in _TIFF_MAGIC:
        raise ValueError(f"{name}: expected a TIFF file, got {path} (starts with {magic!r})")
    try:
        with tifffile.TiffFile(path) as tif:
            index = _series_index(tif.series, series, path, name)
            chosen = tif.series[index]
            axes, shape = chosen.axes, chosen.shape
            _check_complete(chosen, path, name)
            contiguous = chosen.dataoffset is not None
    except Exception as error:  # tifffile raises many types for damaged files
        if isinstance(error, ValueError) and str(error).startswith(f"{name}:"):
            raise
        raise ValueError(f"{name}: TIFF file is truncated or damaged: {path} ({error})") from None
    data = tifffile.memmap(path, series=index, mode="r") if contiguous else _zarr_view(path, index)
    return _yx_last(data.reshape(shape) if data.shape != shape else data, axes, path, name)


def open_image(path, name: str = "input", series: int | None = None) -> LazyImage:
    """Open a TIFF (:func:`read_tiff`), a zarr array or an OME-Zarr image lazily.

    An OME-Zarr image group is read at its first (full-resolution) dataset, with the axis
    names and the channel axis of its metadata; a bare zarr array has axes ``...YX``.
    """
    path = Path(path)
    if path.suffix.lower() != ".zarr":
        return read_tiff(path, name=name, series=series)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such store: {path}")
    import dask.array as da
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # noqa: BLE001 - zarr raises several types for what is not a store
        raise ValueError(f"{name}: {path} is not a readable zarr store ({error})") from None
    axes = None
    if isinstance(node, zarr.Group):
        multiscales: Any = node.attrs.get("multiscales")  # NGFF JSON
        if not multiscales:
            raise ValueError(
                f"{name}: {path} is a zarr group without OME-NGFF 'multiscales' "
                f"metadata; give the path of an array or an image"
            )
        image = multiscales[0]
        node = node[image["datasets"][0]["path"]]
        axes = "".join(
            "C" if a.get("type") == "channel" else a["name"][0].upper()
            for a in image.get("axes", [])
        )
    if not isinstance(node, zarr.Array):
        raise ValueError(f"{name}: {path}: the image's first dataset is not a zarr array")
    if axes is None or len(axes) != node.ndim:
        axes = "Q" * (node.ndim - 2) + "YX"
    return _yx_last(da.from_zarr(node), axes, path, name)


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


def _series_index(all_series, series, path, name) -> int:
    count = len(all_series)
    if series is None:
        if count > 1:
            shapes = ", ".join(
                f"{i}: {tuple(s.shape)} {s.axes}" for i, s in enumerate(all_series[:6])
            )
            raise ValueError(
                f"{name}: {path} holds {count} image series ({shapes}"
                f"{', ...' if count > 6 else ''}); choose one with --series N"
            )
        return 0
    if isinstance(series, bool) or not isinstance(series, int) or not 0 <= series < count:
        raise ValueError(
            f"series: expected an index in [0, {count - 1}] for {path}, got {series!r}"
        )
    return series


def _zarr_view(path, series: int = 0):
    import dask.array as da
    import tifffile
    import zarr

    # level 0: a pyramid's full resolution (its store would otherwise be a multiscale group)
    store = tifffile.imread(path, aszarr=True, series=series, level=0)
    return da.from_zarr(zarr.open(store, mode="r"))


def _yx_last(data, axes: str, path, name) -> LazyImage:
    if "Y" not in axes or "X" not in axes:
        raise ValueError(
            f"{name}: expected an image with Y and X axes, got axes {axes!r} in {path}"
        )
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

    from .channels import GreyView

    if isinstance(data, GreyView):  # the colours it averages are the mapped pages
        data = data.data
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
    target = _TiffTarget(path, shape, dtype, axes, compress)
    try:
        target.write(planes)
        target.commit()
    finally:
        target.discard()
    return target.path


def remove_stale_partials(path) -> list[Path]:
    """Remove the hidden temporary files that runs killed outright (SIGKILL, power loss) left
    beside ``path``; files of processes still alive are kept. Returns the removed paths."""
    path = Path(path)
    removed = []
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        parts = stale.name[len(path.name) + 2 :].split(".")
        if not parts[0].isdigit() or _alive(int(parts[0])):
            continue
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class _TiffTarget:
    """One output TIFF: written to a uniquely named hidden file beside it, then committed."""

    def __init__(self, path, shape, dtype, axes, compress=False):
        import uuid

        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype, self.axes, self.compress = np.dtype(dtype), axes, compress
        # pid + random: two runs never share a temporary file, even with recycled pids
        self.tmp = self.path.with_name(
            f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        )
        remove_stale_partials(self.path)

    def write(self, planes) -> None:
        expected = int(np.prod(self.shape[:-2], dtype=np.int64))
        # strips of 256 rows compressed by several threads (zlib releases the GIL):
        # 1.5x faster on 2 cores for 4096 x 4096 uint32 labels
        strips = {"rowsperstrip": 256, "maxworkers": _COMPRESS_THREADS} if self.compress else {}
        self._write(_checked_planes(planes, self.shape[-2:], self.dtype, expected), **strips)

    def write_tiles(self, tiles, tile: tuple[int, int]) -> None:
        """Write a tiled TIFF from ``tiles``: arrays of shape ``tile``, plane by plane, in
        raster order (memory: one tile, for planes of any size)."""
        self._write((np.asarray(t, self.dtype) for t in tiles), tile=tile)

    def _write(self, data, **layout) -> None:
        import tifffile

        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        with tifffile.TiffWriter(self.tmp, bigtiff=nbytes >= _BIGTIFF_BYTES) as writer:
            writer.write(
                data,
                shape=self.shape,
                dtype=self.dtype,
                photometric="minisblack",
                metadata={"axes": self.axes} if self.axes else {},
                compression="zlib" if self.compress else None,
                compressionargs={"level": 1} if self.compress else None,
                **layout,
            )
        with open(self.tmp, "rb+") as handle:  # on disk before it takes the name
            os.fsync(handle.fileno())

    def commit(self, replace: bool = True) -> None:
        """Give the written file its name. Without ``replace``, a file that appeared at the
        target during the run (another run, another program) is kept: the name is taken with
        a hard link, which fails rather than replace."""
        if replace:
            os.replace(self.tmp, self.path)
            return
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise FileExistsError(
                f"{self.path} appeared during the run and was kept; the result "
                f"was not written (pass --overwrite to replace it)"
            ) from None
        except OSError:  # no hard links on this file system: check, then rename
            if self.path.exists():
                raise FileExistsError(f"{self.path} appeared during the run and was kept") from None
            os.replace(self.tmp, self.path)
        self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _checked_planes(planes, plane_shape, dtype, expected):
    count = 0
    for plane in planes:
        plane = np.asarray(plane)
        if plane.shape != tuple(plane_shape):
            raise ValueError(
                f"plane {count}: expected shape {tuple(plane_shape)}, got {plane.shape}"
            )
        yield plane.astype(dtype, copy=False)
        count += 1
    if count > expected:
        raise ValueError(f"more planes than its shape holds: got {count} of {expected}")
    if count < expected:
        raise IncompleteWrite(f"got {count} planes of {expected}; nothing was written")


def write_tiff_streams(targets, rows, overwrite: bool = True) -> list[Path]:
    """Write several stacks in lockstep, pulling one row of planes at a time; all files are
    committed together, or none is.

    Each file is written (and compressed) by a thread of its own from a small hand-off queue,
    so writing overlaps whatever produces the rows in the calling thread. If any writer fails
    or ``rows`` raises or ends early, every temporary file is removed and no existing file is
    touched.

    Parameters
    ----------
    targets : list of (path, shape, dtype, axes[, compress])
        One entry per file, as the arguments of :func:`write_tiff_stream`.
    rows : iterable of tuples of numpy.ndarray
        The k-th plane of every file, in the order of ``targets``.
    overwrite : bool
        Replace files that exist at commit time; without it, a file that appeared during the
        run is kept and the call raises FileExistsError, committing nothing.

    Returns
    -------
    list of Path
    """
    with TiffStreams(targets, overwrite) as streams:
        for row in rows:
            streams.put(row)
        return streams.commit()


class TiffStreams:
    """Several stacks written in lockstep from rows of planes handed over one at a time (the
    push side of :func:`write_tiff_streams`, for callers that yield progress between planes).

    Use as a context manager: leaving it without :meth:`commit` (an error, a stop) removes
    every temporary file and touches no existing one.

    Parameters
    ----------
    targets, overwrite
        As for :func:`write_tiff_streams`.
    """

    def __init__(self, targets, overwrite: bool = True):
        self.overwrite = overwrite
        self.writers = [_StreamWriter(_TiffTarget(*target)) for target in targets]

    def __enter__(self) -> TiffStreams:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, row) -> None:
        """The next plane of every file, in the order of the targets."""
        for writer, plane in zip(self.writers, row):
            writer.put(plane)

    def commit(self) -> list[Path]:
        """Wait for the writers and give every file its name; raises IncompleteWrite when
        fewer planes than the shapes hold were handed over."""
        for writer in self.writers:
            writer.finish()
        if not self.overwrite:
            for writer in self.writers:
                if writer.target.path.exists():
                    raise FileExistsError(
                        f"{writer.target.path} appeared during the run and was "
                        f"kept; nothing was written (pass --overwrite)"
                    )
        for writer in self.writers:
            writer.target.commit(replace=self.overwrite)
        return [writer.target.path for writer in self.writers]

    def close(self) -> None:
        for writer in self.writers:
            writer.abort()
            writer.target.discard()


def write_tiff_tiled(targets, overwrite: bool = True) -> list[Path]:
    """Write tiled TIFFs from zarr-like arrays, one tile in memory at a time; all files are
    committed together, or none is.

    Parameters
    ----------
    targets : list of (path, source, dtype, axes, compress, tile)
        ``source``: array-like of shape (..., Y, X) read tile by tile (a zarr array);
        ``tile``: (Y, X), multiples of 16 (TIFF's rule).
    overwrite : bool
        As for :func:`write_tiff_streams`.
    """
    written = []
    try:
        for path, source, dtype, axes, compress, tile in targets:
            target = _TiffTarget(path, source.shape, dtype, axes, compress)
            written.append(target)
            target.write_tiles(_tiles_of(source, tile), tile)
        if not overwrite:
            for target in written:
                if target.path.exists():
                    raise FileExistsError(
                        f"{target.path} appeared during the run and was kept; "
                        f"nothing was written (pass --overwrite)"
                    )
        for target in written:
            target.commit(replace=overwrite)
    finally:
        for target in written:
            target.discard()
    return [target.path for target in written]


def _tiles_of(source, tile: tuple[int, int]):
    """Tiles of every plane in raster order, zero-padded to ``tile`` at the right and bottom."""
    height, width = source.shape[-2:]
    for lead in np.ndindex(*source.shape[:-2]):
        for y in range(0, height, tile[0]):
            for x in range(0, width, tile[1]):
                part = np.asarray(source[lead + (slice(y, y + tile[0]), slice(x, x + tile[1]))])
                padded = np.zeros(tile, part.dtype)
                padded[: part.shape[0], : part.shape[1]] = part
                yield padded


_END, _ABORT = object(), object()


class _StreamWriter:
    """A thread that writes one :class:`_TiffTarget` from planes handed to it."""

    def __init__(self, target: _TiffTarget):
        import queue
        import threading

        self.target = target
        self.handoff: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, daemon=True, name=f"write {target.path.name}"
        )
        self.thread.start()

    def put(self, plane) -> None:
        """Hand one plane over; raises the writer's error if it has failed."""
        import queue

        while True:
            self._raise_if_failed()
            try:
                self.handoff.put(plane, timeout=0.05)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Signal the end and wait until the file is written; raise the writer's error."""
        self.put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop the writer (it discards its file); returns once the thread has ended."""
        import queue

        while self.thread.is_alive():
            try:
                self.handoff.put(_ABORT, timeout=0.05)
            except queue.Full:
                with contextlib.suppress(queue.Empty):  # make room: the writer may be busy, or gone
                    self.handoff.get_nowait()
            self.thread.join(timeout=0.05)

    def _raise_if_failed(self):
        if self.error is not None:
            raise self.error
        if not self.thread.is_alive():
            raise RuntimeError(f"writer of {self.target.path} ended early")

    def _run(self):
        try:
            planes = self._planes()
            self.target.write(planes)
            # tifffile stops pulling once the stack is full: wait for the producer's end too
            for _ in planes:
                raise ValueError(
                    f"{self.target.path}: more planes than its shape {self.target.shape} holds"
                )
        except BaseException as error:  # handed to the producer's thread
            self.error = error
        finally:
            self._drain()

    def _planes(self):
        while (item := self.handoff.get()) is not _END:
            if item is _ABORT:
                raise IncompleteWrite("stopped; nothing was written")
            yield item

    def _drain(self):
        import queue

        while True:
            try:
                self.handoff.get_nowait()
            except queue.Empty:
                return
