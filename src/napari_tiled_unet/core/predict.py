"""Overlap-tile inference engine: a generator over tile batches with progress and cancel.

The engine reads the input tile by tile (numpy, memmap, zarr or dask arrays) and writes each
output tile into an array the caller provides, so memory is bounded by the tile batch, not by
the stack. Convolutions run channels_last. On CUDA it runs under autocast (bf16 where
supported, else fp16), copies batches through pinned host buffers while the previous batch
computes, picks the tile size from free GPU memory and retries with a smaller tile after an
out-of-memory error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from .normalize import Normalization
from .shapes import leading_shape, normalised_axis
from .tiling import Tile, TilePlan, plan_axis, plan_tiles

OUTPUTS = ("foreground", "classes")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_CPU_ACTIVATION_BUDGET = 3 << 29  # 1.5 GiB
_GPU_MEMORY_FRACTION = 0.5
# On CUDA, tiles this large already amortise the margin (9% overlap waste for the bundled
# model); larger ones only hold memory (the paper net took 62 GiB at 3196 px for no gain).
_MAX_CUDA_TILE = 2048
_MAX_CUDA_BATCH = 16
COMPILE_MIN_TILES = 64


@dataclass(frozen=True)
class Progress:
    """A progress event.

    Attributes
    ----------
    done, total : int
        Tiles written and tiles planned (``total`` changes if an out-of-memory retry re-plans).
    tile_shape : (int, int)
        Input tile size (Y, X) in use.
    planes_done : int
        Leading-axis planes (in C order) whose every tile has been written.
    stopped : bool
        True on the last event when ``should_stop`` ended the run early.
    """

    done: int
    total: int
    tile_shape: tuple[int, int]
    planes_done: int = 0
    stopped: bool = False


def predict(
    model,
    image,
    out,
    *,
    channel_axis: int | None = None,
    output: str = "foreground",
    tile: int | str | tuple[int, int] = "auto",
    batch: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    normalization: Normalization | None = None,
    should_stop: Callable[[], bool] | None = None,
    compile: bool | str = "auto",
    region: tuple[slice, slice] | None = None,
) -> Iterator[Progress]:
    """Predict ``image`` tile by tile into ``out``; returns a generator of :class:`Progress`.

    Arguments are checked when this function is called, before any work; the work runs as
    the generator is consumed.

    Parameters
    ----------
    model : UNet
        Moved to ``device`` and put in eval mode.
    image : array-like, shape (..., Y, X)
        numpy array, memmap, zarr or dask array, any real numeric dtype. Every axis before Y, X
        except ``channel_axis`` is iterated (T, Z, ...).
    out : array-like
        Written in place. ``output="foreground"``: shape (*leading, Y, X), the foreground
        probability (class 1). ``output="classes"``: shape (*leading, n_classes, Y, X), the
        softmax over classes.
    channel_axis : int, optional
        Axis of ``image`` holding channels; required when the model has several input channels.
    tile : "auto", int or (int, int)
        Input tile size; "auto" picks it from free GPU memory (CUDA) or a 1.5 GiB activation
        budget (CPU). Shrunk when larger than the image needs.
    batch : "auto" or int
        Tiles per forward pass; "auto" is 4 on CUDA and 1 on CPU (where batching does not
        speed convolutions up but multiplies memory).
    device : str
        "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
    precision : {"auto", "fp32", "bf16", "fp16"}
        "auto" is bf16 (or fp16) autocast on CUDA and fp32 on CPU.
    normalization : Normalization, optional
        Defaults to ``model.normalization``, else none.
    should_stop : callable, optional
        Polled before each batch; when it returns True the generator yields a final event with
        ``stopped=True`` and ends.
    compile : "auto" or bool
        Run the network through ``torch.compile`` (compiled once per tile shape; any compiler
        failure falls back to the plain network). "auto": on CUDA for runs of at least
        ``COMPILE_MIN_TILES`` tiles, where the compile time pays off.
    region : (slice, slice), optional
        Predict only this (Y, X) block of every plane; ``out`` then has the block's size in
        place of (Y, X). Only the block and its context are read, mirrored at the image's own
        borders only, so the result equals the same block of a whole-plane pass. Starts must
        be multiples of the model's pooling step (``model.size_step``).

    Returns
    -------
    generator of Progress
    """
    job = _Job.checked(
        model,
        image,
        out,
        channel_axis,
        output,
        tile,
        batch,
        device,
        precision,
        normalization,
        should_stop,
        compile,
        region,
    )
    return job.run()


def predict_array(model, image, **options) -> np.ndarray:
    """Run :func:`predict` to completion into a new float32 numpy array and return it.

    Returns
    -------
    numpy.ndarray of float32
        Shape (*leading, Y, X) for ``output="foreground"`` (default), else
        (*leading, n_classes, Y, X).
    """
    leading = leading_shape(tuple(image.shape), options.get("channel_axis"))
    classes = (model.config.n_classes,) if options.get("output") == "classes" else ()
    out = np.zeros(leading + classes + tuple(image.shape[-2:]), np.float32)
    for _ in predict(model, image, out, **options):
        pass
    return out


def resolve_device(device: str):
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a ``torch.device``, checking it exists."""
    import torch

    if not isinstance(device, str):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested, but no CUDA device is available")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r} requested, but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist"
            )
        return torch.device("cuda", index)
    raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class PlaneView:
    """One plane of an image (..., [C,] ..., Y, X) as a lazily indexed (C, Y, X) array: ``lead``
    indexes every axis before Y, X but ``channel_axis`` (C is 1 without one)."""

    def __init__(self, image, lead: tuple[int, ...], channel_axis: int | None):
        self.image = image
        prefix, lead_iter = [], iter(lead)
        for axis in range(image.ndim - 2):
            prefix.append(slice(None) if axis == channel_axis else next(lead_iter))
        self.prefix = tuple(prefix)
        self.has_channels = channel_axis is not None
        channels = image.shape[channel_axis] if self.has_channels else 1
        self.shape = (channels,) + tuple(image.shape[-2:])
        self.dtype = np.dtype(image.dtype)
        self.ndim = 3

    def __getitem__(self, key):
        _, rows, cols = key
        block = np.asarray(self.image[self.prefix + (rows, cols)])
        return block if self.has_channels else block[None]

    def release_pages(self) -> None:
        """Drop the pages a memmapped image mapped in this process (no-op otherwise)."""
        from .io import release_mapped_pages

        release_mapped_pages(self.image)


@dataclass(frozen=True)
class _TileSource:
    """Where one tile reads: the bounding box of its mirrored source pixels, and the gather
    indices into that box (None where the box already is the tile, as for inner tiles)."""

    tile: Tile
    box: tuple[slice, slice]
    rows: np.ndarray | None
    cols: np.ndarray | None

    @classmethod
    def of(cls, tile: Tile) -> _TileSource:
        y0, y1 = int(tile.rows.min()), int(tile.rows.max()) + 1
        x0, x1 = int(tile.cols.min()), int(tile.cols.max()) + 1
        return cls(
            tile,
            (slice(y0, y1), slice(x0, x1)),
            _gather_or_none(tile.rows - y0),
            _gather_or_none(tile.cols - x0),
        )


def _gather_or_none(indices: np.ndarray) -> np.ndarray | None:
    return None if np.array_equal(indices, np.arange(len(indices))) else indices


@dataclass
class _Item:
    """One tile on its way through the pipeline."""

    index: int  # plane number (C order)
    lead: tuple[int, ...]
    source: _TileSource
    raw: np.ndarray  # (C, h, w) in the input's own dtype: the source box
    stats: Any  # Future of the plane's (offset, scale)
    ready: Any = None  # CPU: the network input (C, H, W), prepared in the reader thread


class _Reader:
    """Reads raw tile boxes in background threads, in order, a bounded window ahead.

    Decompression (tifffile, zarr) and memmap page faults release the GIL, so the threads
    overlap reading with compute; the window bounds memory to a few batches of raw tiles.
    """

    def __init__(
        self,
        job: _Job,
        plan: TilePlan,
        leads,
        first_index: int,
        ahead: int,
        prepare: Callable[[_Item], object] | None = None,
    ):
        from concurrent.futures import ThreadPoolExecutor

        self.job, self.ahead, self.prepare = job, ahead, prepare
        self.sources = [_TileSource.of(tile) for tile in plan]
        self.pool = ThreadPoolExecutor(
            max_workers=_reader_threads(), thread_name_prefix="tile-reader"
        )
        self.order = ((index, lead) for index, lead in enumerate(leads, start=first_index))
        self.check_finite = not isinstance(job.image, np.ndarray) and _is_float(job.image.dtype)

    def items(self) -> Generator[_Item, None, None]:
        from collections import deque

        window: deque = deque()
        pending = self._submissions()
        try:
            for future in pending:
                window.append(future)
                if len(window) > self.ahead:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _submissions(self):
        for index, lead in self.order:
            view = PlaneView(self.job.image, lead, self.job.channel_axis)
            stats = self.pool.submit(self.job.normalization.plane_stats, view)
            for source in self.sources:
                yield self.pool.submit(self._read, index, lead, view, source, stats)

    def _read(self, index, lead, view, source: _TileSource, stats) -> _Item:
        raw = np.ascontiguousarray(view[(slice(None),) + source.box])
        if not raw.flags.writeable:  # a read-only memmap: torch wants memory of its own
            raw = raw.copy()
        if self.check_finite:
            if not np.isfinite(raw).all():
                raise ValueError(f"image: contains NaN or Inf values (plane {lead})")
            _check_float32_range(raw)
        item = _Item(index, lead, source, raw, stats)
        if self.prepare is not None:
            # The plane's statistics task was queued before its tiles, so it is running or done.
            item.ready = self.prepare(item)
        return item


def _reader_threads() -> int:
    import os

    return max(2, min(4, os.cpu_count() or 2))


@dataclass
class _Job:
    model: Any
    image: Any
    out: Any
    channel_axis: int | None
    output: str
    tile: Any
    batch: int
    device: Any
    precision: str
    normalization: Normalization
    should_stop: Callable[[], bool]
    compile: bool | str = False
    region: tuple[slice, slice] | None = None
    # Planes (in C order) whose every tile is written: where an out-of-memory retry resumes.
    _complete_planes: int = field(default=0, init=False)

    @classmethod
    def checked(
        cls,
        model,
        image,
        out,
        channel_axis,
        output,
        tile,
        batch,
        device,
        precision,
        normalization,
        should_stop,
        compile,
        region=None,
    ):
        check_image(image)
        channel_axis = normalised_axis(channel_axis, image.ndim)
        if channel_axis is not None and channel_axis >= image.ndim - 2:
            raise ValueError(
                f"channel_axis: the last two axes are Y and X; expected an axis before them, "
                f"got {channel_axis}"
            )
        _check_channels(model, image, channel_axis)
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        region = _checked_region(region, tuple(image.shape[-2:]), model.size_step)
        _check_out(out, _expected_out_shape(model, image, channel_axis, output, region))
        _check_tile(tile)
        _warn_if_below_smallest(tile, model)
        torch_device = resolve_device(device)
        if batch == "auto":
            batch = 4 if torch_device.type == "cuda" else 1
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch: expected 'auto' or a positive integer, got {batch!r}")
        precision = _resolve_precision(precision, torch_device)
        compile = _resolve_compile(compile, torch_device)
        norm = normalization or model.normalization
        return cls(
            model,
            image,
            out,
            channel_axis,
            output,
            tile,
            int(batch),
            torch_device,
            precision,
            norm,
            should_stop or (lambda: False),
            compile,
            region,
        )

    @property
    def leads(self) -> list[tuple[int, ...]]:
        shape = list(leading_shape(self.image.shape, self.channel_axis))
        return list(np.ndindex(*shape))

    def run(self) -> Iterator[Progress]:
        import torch

        self.model.to(self.device).eval()
        leads = self.leads
        tile = (
            self.tile
            if self.tile != "auto"
            else _auto_tile(self.model, self.device, self.precision, self.batch)
        )
        first_incomplete = 0
        with _exact_fp32(self.device, self.precision):
            while True:
                plan = _balanced_plan(
                    self.image.shape[-2:], tile, self.model, self.tile == "auto", self.region
                )
                try:
                    yield from self._run_planes(plan, leads, first_incomplete)
                    return
                except torch.cuda.OutOfMemoryError:
                    first_incomplete = self._complete_planes
                    tile = _smaller_tile(plan, self.model)
                    torch.cuda.empty_cache()

    def _run_planes(self, plan: TilePlan, leads, start: int) -> Iterator[Progress]:
        per_plane, total = len(plan), len(plan) * len(leads)
        written: dict[int, int] = {}
        self._complete_planes = start
        done = start * per_plane
        compile = total >= COMPILE_MIN_TILES if self.compile == "auto" else bool(self.compile)
        runner = _Runner(self.model, self.device, self.precision, self.output, compile)
        reader = _Reader(
            self,
            plan,
            leads[start:],
            start,
            ahead=2 * self.batch + 2,
            prepare=None if runner.cuda else runner.host_input,
        )
        items = reader.items()
        pending = None
        try:
            for batch in _batched(items, self.batch):
                if self.should_stop():
                    yield Progress(
                        done, total, plan.input_shape, self._complete_planes, stopped=True
                    )
                    return
                handle = runner.submit(batch)
                if pending is not None:
                    done += self._write(pending, runner, written, per_plane)
                    yield Progress(done, total, plan.input_shape, self._complete_planes)
                pending = (batch, handle)
            if pending is not None:
                done += self._write(pending, runner, written, per_plane)
                yield Progress(done, total, plan.input_shape, self._complete_planes)
        finally:
            items.close()

    def _write(self, pending, runner, written, per_plane) -> int:
        items, handle = pending
        result = runner.collect(handle)
        channels = () if self.output == "foreground" else (slice(None),)
        for item, probabilities in zip(items, result):
            tile = item.source.tile
            self.out[item.lead + channels + (tile.out_y, tile.out_x)] = probabilities[
                ..., tile.crop_y, tile.crop_x
            ]
            written[item.index] = written.get(item.index, 0) + 1
            if written[item.index] == per_plane:
                self._complete_planes = item.index + 1
                del written[item.index]
        return len(items)


class _Runner:
    """Runs batches on the device.

    Raw tiles go to the device in their own dtype; mirroring (a gather), float conversion,
    normalisation, the network, softmax and the choice of the output channel all run there. On
    CUDA the upload goes through a reused pinned buffer on a copy stream, results come back in
    half precision (fp32 mode: single) into reused pinned buffers, and one batch's transfers
    overlap the previous one's compute.
    """

    def __init__(self, model, device, precision: str, output: str, compile: bool = False):
        import torch

        self.torch = torch
        self.device = device
        self.output = output
        self.distance = model.config.output_mode == "distance"
        self.cuda = device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.result_dtype = torch.float32 if self.dtype is None else torch.float16
        # NHWC convolutions are faster on both oneDNN (CPU, ~1.4x measured) and cuDNN.
        model.to(memory_format=torch.channels_last)
        self.network = _network_for(model, device, self.dtype, compile)
        self.staging = _PinnedPool(torch) if self.cuda else None
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)

    def submit(self, items: list[_Item]):
        torch = self.torch
        if not self.cuda:
            inputs = [item.ready for item in items]
            batch = inputs[0][None] if len(inputs) == 1 else torch.stack(inputs)
            return self._probabilities(batch.contiguous(memory_format=torch.channels_last))
        with torch.cuda.device(self.device):
            return self._submit_cuda(items)

    def host_input(self, item: _Item):
        """The network input of one tile, on the CPU (runs in a reader thread)."""
        offset, scale = item.stats.result()
        torch = self.torch
        return self._tile_input(
            item.source,
            torch.from_numpy(item.raw),
            torch.from_numpy(offset),
            torch.from_numpy(scale),
        )

    def _submit_cuda(self, items):
        torch = self.torch
        stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            hosts = self.staging.filled([i.raw for i in items])
            uploaded = [h.to(self.device, non_blocking=True) for h in hosts]
        stream.wait_stream(self.copy_stream)
        for tensor in uploaded:
            tensor.record_stream(stream)
        inputs = []
        for item, raw in zip(items, uploaded):
            offset, scale = (
                torch.from_numpy(a).to(self.device, non_blocking=True) for a in item.stats.result()
            )
            inputs.append(self._tile_input(item.source, raw, offset, scale))
        batch = torch.stack(inputs).contiguous(memory_format=torch.channels_last)
        result = self._probabilities(batch)
        pinned = self.staging.result(tuple(result.shape), result.dtype)
        pinned.copy_(result, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        self.staging.release_after(done, hosts)
        return pinned, done

    def _tile_input(self, source: _TileSource, raw, offset, scale):
        """Convert to float, mirror (gather) and normalise one raw tile, where ``raw`` lives.

        The copy comes first: ``raw`` may be a view of the caller's image, and CUDA has no
        gather kernels for unsigned 16- and 32-bit integers."""
        tile = raw.to(self.torch.float32, copy=True)
        if source.rows is not None:
            tile = tile.index_select(1, self._indices(source.rows, raw.device))
        if source.cols is not None:
            tile = tile.index_select(2, self._indices(source.cols, raw.device))
        return tile.sub_(offset).mul_(scale)

    def _indices(self, indices: np.ndarray, device):
        return self.torch.from_numpy(indices).to(device, non_blocking=True)

    def collect(self, handle) -> np.ndarray:
        if not self.cuda:
            return handle.numpy()
        pinned, done = handle
        done.synchronize()
        return pinned.numpy()

    def _probabilities(self, x):
        torch = self.torch
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
            ),
        ):
            logits = self.network(x).float()
        if self.distance:
            # background / foreground softmax, then the distance map through its sigmoid
            if self.output == "foreground":
                picked = torch.sub(logits[:, 1], logits[:, 0]).sigmoid_()
            else:
                picked = torch.cat([torch.softmax(logits[:, :2], 1), logits[:, 2:3].sigmoid()], 1)
        elif logits.shape[1] == 1:
            probabilities = torch.sigmoid(logits)
            picked = probabilities[:, 0] if self.output == "foreground" else probabilities
        elif logits.shape[1] == 2 and self.output == "foreground":
            # softmax(l)[1] == sigmoid(l1 - l0): one channel instead of a two-channel softmax
            picked = torch.sub(logits[:, 1], logits[:, 0]).sigmoid_()
        else:
            probabilities = torch.softmax(logits, dim=1)
            picked = probabilities[:, 1] if self.output == "foreground" else probabilities
        return picked.to(self.result_dtype).contiguous()


class _PinnedPool:
    """Page-locked host buffers reused across batches: raw-tile uploads and results.

    A buffer handed to an asynchronous copy is reused only after the event recorded behind
    that copy has completed.
    """

    def __init__(self, torch):
        self.torch = torch
        self.free: dict[tuple, list] = {}
        self.busy: list = []
        self.results: dict[tuple, list] = {}

    def filled(self, arrays: list[np.ndarray]):
        self._reclaim()
        hosts = []
        for array in arrays:
            buffer = self._take(self.free, tuple(array.shape), array.dtype)
            buffer.numpy()[...] = array
            hosts.append(buffer)
        return hosts

    def result(self, shape, dtype):
        # Two result buffers per shape alternate: one being filled, one being read.
        ring = self.results.setdefault((shape, dtype), [])
        if len(ring) < 2:
            ring.append(self.torch.empty(shape, dtype=dtype, pin_memory=True))
        ring.append(ring.pop(0))
        return ring[-1]

    def release_after(self, event, buffers):
        self.busy.append((event, buffers))

    def _reclaim(self):
        still = []
        for event, buffers in self.busy:
            if event.query():
                for buffer in buffers:
                    key = (tuple(buffer.shape), buffer.numpy().dtype)
                    self.free.setdefault(key, []).append(buffer)
            else:
                still.append((event, buffers))
        self.busy = still

    def _take(self, pool, shape, dtype):
        stack = pool.get((shape, np.dtype(dtype)))
        if stack:
            return stack.pop()
        return self.torch.from_numpy(np.empty(shape, dtype)).pin_memory()


def _network_for(model, device, dtype, compile: bool):
    """The callable that runs the model: on CUDA with a first layer padded to 8 input channels
    (zero weights, identical results) so that cuDNN takes its tensor-core kernels, compiled with
    ``torch.compile`` when asked; compile errors fall back to the plain model."""
    network = model
    if device.type == "cuda" and model.config.in_channels % 8:
        network = _ChannelPadded(model)
    if compile:
        network = _Compiled(network)
    return network


class _ChannelPadded:
    """The model with its input zero-padded to a multiple of 8 channels and the first
    convolution's weights padded to match (the extra channels contribute exactly 0)."""

    def __init__(self, model):
        import copy

        import torch

        self.model = copy.deepcopy(model)
        first = self.model.down[0][0]
        padded = -first.in_channels % 8
        conv = torch.nn.Conv2d(
            first.in_channels + padded,
            first.out_channels,
            3,
            padding=first.padding,
            bias=first.bias is not None,
        )
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, : first.in_channels] = first.weight
            if first.bias is not None:
                conv.bias.copy_(first.bias)
        self.model.down[0][0] = conv.to(first.weight.device, memory_format=torch.channels_last)
        self.padded = padded

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        x = F.pad(x, (0, 0, 0, 0, 0, self.padded))
        return self.model(x.contiguous(memory_format=torch.channels_last))


class _Compiled:
    """``torch.compile`` of a network, compiled once per input shape (dynamic=False); if
    compiling or running the compiled graph fails, the plain network is used from then on."""

    def __init__(self, network):
        import torch

        self.plain = network
        self.compiled = torch.compile(network, dynamic=False)
        self.failed = False

    def __call__(self, x):
        if not self.failed:
            try:
                return self.compiled(x)
            except Exception as error:  # noqa: BLE001 -- any compiler failure falls back
                import torch

                if isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                self.failed = True
        return self.plain(x)


class _exact_fp32:
    """In fp32 mode on CUDA, turn TF32 off (restored afterwards) so that tiled results stay
    within 1e-5 of a whole-image pass."""

    def __init__(self, device, precision: str):
        self.active = device.type == "cuda" and precision == "fp32"

    def __enter__(self):
        if self.active:
            import torch

            self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        if self.active:
            import torch

            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False


def _batched(iterable, size):
    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def check_image(image) -> None:
    """Raise ValueError unless ``image`` is a non-empty real numeric array of at least 2 axes
    (and, for an in-memory float array, finite)."""
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise ValueError(
            f"image: expected an array (numpy, memmap, zarr or dask), got {type(image).__name__}"
        )
    if image.ndim < 2:
        raise ValueError(
            f"image: expected at least 2 axes (..., Y, X), got shape {tuple(image.shape)}"
        )
    if 0 in tuple(image.shape):
        raise ValueError(f"image: expected a non-empty array, got shape {tuple(image.shape)}")
    dtype = np.dtype(image.dtype)
    if dtype == np.bool_ or not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise ValueError(f"image: expected a real numeric dtype (integer or float), got {dtype}")
    if isinstance(image, np.ndarray) and _is_float(dtype):
        # Plane by plane, so a float memmap is not loaded whole.
        for plane in image.reshape((-1,) + image.shape[-2:]):
            if not np.isfinite(plane).all():
                raise ValueError("image: expected finite values, got NaN or Inf")
            _check_float32_range(plane)


def _check_float32_range(values: np.ndarray) -> None:
    # the network computes in float32 (or less): larger values would become inf, then NaN
    if (
        values.dtype.itemsize > 4
        and values.size
        and np.abs(values).max() > np.finfo(np.float32).max
    ):
        raise ValueError(
            f"image: values beyond the float32 range (largest magnitude "
            f"{np.abs(values).max():.3g}); rescale the image first"
        )


def _check_channels(model, image, channel_axis):
    expected = model.config.in_channels
    given = 1 if channel_axis is None else image.shape[channel_axis]
    if given != expected:
        where = "no channel axis" if channel_axis is None else f"axis {channel_axis}"
        raise ValueError(
            f"channel_axis: the model expects {expected} input channel(s), got {given} "
            f"({where} of image shape {tuple(image.shape)})"
        )


def _expected_out_shape(model, image, channel_axis, output, region=None):
    leading = leading_shape(tuple(image.shape), channel_axis)
    classes = (model.config.n_classes,) if output == "classes" else ()
    plane = tuple(image.shape[-2:]) if region is None else tuple(s.stop - s.start for s in region)
    return leading + classes + plane


def _checked_region(region, plane: tuple[int, int], step: int) -> tuple[slice, slice] | None:
    """``region`` as two slices with explicit bounds inside ``plane``, starts on the pooling grid."""
    if region is None:
        return None
    if not (
        isinstance(region, tuple) and len(region) == 2 and all(isinstance(s, slice) for s in region)
    ):
        raise ValueError(f"region: expected a (Y, X) pair of slices, got {region!r}")
    bounds = []
    for axis, (part, length) in enumerate(zip(region, plane)):
        start, stop, stride = part.indices(length)
        if stride != 1 or stop <= start or start % step:
            raise ValueError(
                f"region: expected non-empty slices without step, starting at multiples "
                f"of the model's pooling step {step}, got {part} on axis {axis} "
                f"({length} px)"
            )
        bounds.append(slice(start, stop))
    return bounds[0], bounds[1]


def _check_out(out, expected):
    if not hasattr(out, "shape") or not hasattr(out, "__setitem__"):
        raise ValueError(
            f"out: expected a writable array of shape {expected}, got {type(out).__name__}"
        )
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape {expected}, got {tuple(out.shape)}")
    if not _is_float(out.dtype):
        raise ValueError(
            f"out: expected a float dtype for probabilities, got {np.dtype(out.dtype)}"
        )


def positive_or_auto(name: str, text) -> int | str:
    """A tile or batch setting typed by a user: "auto", or a positive integer given as text.

    Raises
    ------
    ValueError
        Naming ``name``, when ``text`` is neither.
    """
    text = str(text).strip()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"{name}: expected a positive integer or 'auto', got {text!r}")


def _check_tile(tile):
    if tile == "auto":
        return
    sizes = tile if isinstance(tile, tuple) else (tile, tile)
    if len(sizes) != 2 or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in sizes
    ):
        raise ValueError(f"tile: expected 'auto', a positive integer or (Y, X), got {tile!r}")


def smallest_tile(geometry) -> int:
    """The smallest input tile the engine uses for a model: one that predicts one pooling step
    (a smaller request is raised to it)."""
    return geometry.legal_input_size(geometry.size_step)


def _warn_if_below_smallest(tile, model) -> None:
    import warnings

    if tile == "auto":
        return
    smallest = smallest_tile(model)
    if min(tile if isinstance(tile, tuple) else (tile,)) < smallest:
        warnings.warn(
            f"tile: {tile} px is below this model's smallest tile ({smallest} px); "
            f"using {smallest} px. Small tiles are slow: 'auto' picks a fast size.",
            UserWarning,
            stacklevel=4,
        )


def _resolve_compile(compile, device) -> bool | str:
    if compile == "auto":
        return "auto" if device.type == "cuda" else False
    if not isinstance(compile, bool):
        raise ValueError(f"compile: expected 'auto', True or False, got {compile!r}")
    return compile


def _resolve_precision(precision, device):
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision: 'fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
    return precision


def _auto_tile(model, device, precision, batch) -> int:
    """Largest input tile whose activations fit the memory budget for ``batch`` tiles."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        budget = _GPU_MEMORY_FRACTION * free
        per_pixel = _measured_bytes_per_pixel(model, device, precision)
        cap = _MAX_CUDA_TILE
    else:
        budget = _CPU_ACTIVATION_BUDGET
        # Peak RSS per input pixel measured on CPU: ~10 float32 maps of base width plus fixed
        # costs (input, normalisation, probabilities).
        per_pixel = 4 * (10 * model.config.base_channels + 40)
        # CPU convolutions run fastest on moderate tiles (cache); keep the overlap waste of the
        # margin small all the same.
        cap = max(512, 5 * model.margin)
    side = int(math.sqrt(budget / (per_pixel * batch)))
    return max(model.legal_input_size(1), min(side, cap))


def _measured_bytes_per_pixel(model, device, precision) -> float:
    import torch

    size = model.legal_input_size(128)
    probe = torch.zeros(1, model.config.in_channels, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with (
        torch.inference_mode(),
        torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32),
    ):
        model(probe.contiguous(memory_format=torch.channels_last))
    peak = torch.cuda.max_memory_allocated(device) - base
    return max(peak, 1) / size**2


def _balanced_plan(shape, tile, model, balance: bool, region=None) -> TilePlan:
    """Plan tiles; with ``balance``, shrink each axis's tile to the smallest one that needs no
    more tiles than the largest allowed (less overhang past the image, less wasted compute)."""
    if not balance:
        return plan_tiles(tuple(shape), tile, model, region)
    sizes = []
    lengths = shape if region is None else [s.stop - s.start for s in region]
    for length in lengths:
        largest = plan_axis(length, tile, model)
        count, size = len(largest.positions), largest.input_size
        while size > model.legal_input_size(1):
            smaller = plan_axis(length, size - 1, model)
            if len(smaller.positions) > count or smaller.input_size >= size:
                break
            size = smaller.input_size
        sizes.append(size)
    return plan_tiles((shape[0], shape[1]), (sizes[0], sizes[1]), model, region)


def _smaller_tile(plan: TilePlan, model) -> tuple[int, int]:
    floor = model.legal_input_size(model.size_step)
    if max(plan.input_shape) <= floor:
        import torch

        raise torch.cuda.OutOfMemoryError("out of memory even with the smallest legal tile")
    return tuple(max(floor, int(n * 0.7)) for n in plan.input_shape)
