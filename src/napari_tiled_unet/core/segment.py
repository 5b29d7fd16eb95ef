"""Streaming segmentation: the engine's probabilities -> instance labels, plane by plane.

The one loop that the command line and the Segment widget both drain. The engine
(:func:`~.predict.predict`) writes into a buffer that holds only the planes still being
written; each completed plane is labelled in a background thread (scipy's labelling and
scikit-image's watershed release the GIL), overlapped with the prediction of the next planes,
and handed to the caller in plane order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .normalize import Normalization
from .postprocess import check_split, decode_plane, foreground_probability, postprocess_options
from .rescale import (
    LARGEST_FACTOR,
    SMALLEST_FACTOR,
    Rescaled,
    back_to_original,
    check_factor,
    factor_for,
    working_factor,
)
from .targets import engine_output


@dataclass(frozen=True)
class PlaneResult:
    """One segmented plane.

    Attributes
    ----------
    index : int
        Plane number in C order over the leading axes.
    lead : tuple of int
        Leading index of the plane (channel axis excluded).
    labels : numpy.ndarray of uint32, shape (Y, X)
        Instance ids 1..count (0 = background); they restart in each plane.
    probability : numpy.ndarray of float32, shape (Y, X)
        Foreground probability.
    count : int
    maps : numpy.ndarray of float32, shape (Y', X') or (3, Y', X')
        What the labels were decoded from, at the working scale: kept by callers that relabel
        with other post-processing options without the network (:func:`relabel_plane`).
    """

    index: int
    lead: tuple[int, ...]
    labels: np.ndarray
    probability: np.ndarray
    count: int
    maps: np.ndarray | None = None


@dataclass(frozen=True)
class SegmentEvent:
    """Progress of :func:`segment`.

    Attributes
    ----------
    done, total : int
        Tiles predicted and planned.
    planes_done, planes_total : int
        Planes labelled (handed out so far) and planes in all.
    tile_shape : (int, int)
        Input tile size in use.
    planes : tuple of PlaneResult
        Planes labelled since the previous event, in plane order.
    stopped : bool
        True on the last event when ``should_stop`` ended the run early.
    diameter : float or None
        Object diameter (px, original grid) the run worked with: given, or estimated ("auto").
    factor : float
        Working scale / original scale (1.0: the image was segmented as it is).
    """

    done: int
    total: int
    planes_done: int
    planes_total: int
    tile_shape: tuple[int, int]
    planes: tuple[PlaneResult, ...] = ()
    stopped: bool = False
    diameter: float | None = None
    factor: float = 1.0


def segment(
    model,
    image,
    *,
    channel_axis: int | None = None,
    threshold: float | None = None,
    min_size: int | None = None,
    split: int | None = None,
    min_peak: float | None = None,
    tile: int | str | tuple[int, int] = "auto",
    batch: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    normalization: Normalization | None = None,
    should_stop: Callable[[], bool] | None = None,
    workers: int = 2,
    diameter: float | str | None = None,
) -> Iterator[SegmentEvent]:
    """Segment ``image`` plane by plane into instance labels; returns a generator of events.

    Arguments are checked when this function is called, before any work.

    Parameters
    ----------
    model : UNet
        A 2-class (paper) or 3-class (boundary) model (:mod:`.targets`).
    image : array-like, shape (..., Y, X)
        As for :func:`~.predict.predict`.
    threshold, min_size, split, min_peak : optional
        Post-processing (:func:`.postprocess.decode_plane`); default: the model's
        recommendation, else 0.5, 0, 0 and 0.0.
    tile, batch, device, precision, normalization, channel_axis
        Passed to :func:`~.predict.predict`.
    should_stop : callable, optional
        Polled before each tile batch; a stop yields a last event with ``stopped=True``.
    workers : int
        Threads that label completed planes.
    diameter : float, "auto" or None
        Typical object diameter in the image (px). Each plane is then segmented at the scale
        where objects match the model's training diameter (``metadata["diameter"]``), and the
        labels are mapped back to the image's grid. "auto" estimates it from the first plane
        (:func:`estimate_diameter`). None: the image as it is.

    Returns
    -------
    generator of SegmentEvent
    """
    from .predict import check_image, predict
    from .shapes import leading_shape

    options = postprocess_options(model.metadata, threshold, min_size, split, min_peak)
    check_split(options.split, model.config.output_mode)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive integer, got {workers!r}")
    check_image(image)
    output = engine_output(model.config)
    leading = leading_shape(tuple(image.shape), channel_axis)
    engine: dict[str, Any] = {
        "tile": tile,
        "batch": batch,
        "device": device,
        "precision": precision,
        "normalization": normalization,
    }
    diameter, factor = _working_scale(model, image, channel_axis, diameter, options, engine)
    working = image if factor == 1.0 else Rescaled(image, factor)
    channels = model.config.n_classes if output == "classes" else None
    sink = PlaneBuffer(leading, tuple(working.shape[-2:]), channels=channels)
    events = predict(
        model,
        working,
        sink,
        channel_axis=channel_axis,
        output=output,
        should_stop=should_stop,
        **engine,
    )
    labeller = _Labeller(
        sink,
        leading,
        options,
        workers,
        tuple(image.shape[-2:]),
        diameter,
        factor,
        model.config.output_mode,
    )
    return labeller.drain(events)


_ESTIMATE_WINDOW = 1024


def _working_scale(model, image, channel_axis, diameter, options, engine):
    """(object diameter, working-scale factor) for ``diameter`` (None, px or "auto")."""
    if diameter is None:
        return None, 1.0
    if diameter != "auto":
        factor = working_factor(model.metadata, diameter)
        check_factor(factor)
        return float(diameter), factor
    factor_for(model.metadata.get("diameter"), 1.0)  # the model must know its size: fail early
    diameter = estimate_diameter(
        model, image, channel_axis, options.threshold, options.min_size, options.min_peak, **engine
    )
    if diameter is None:  # nothing found: nothing to scale by
        return None, 1.0
    # an estimate beyond the working scales is used as far as they reach, not refused
    factor = min(max(working_factor(model.metadata, diameter), SMALLEST_FACTOR), LARGEST_FACTOR)
    return float(diameter), factor


# down to 1/8 (the smallest working scale): objects up to ~13x the model's size are found
_SEARCH_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)
# objects the model segments as objects: within this range of its training diameter
_COMFORT = (0.6, 1.6)
# a scale is searched only where the window is this many model-sized objects across: in a
# smaller one, one blob (or the whole window) would pass for an object
_WINDOW_OBJECTS = 4


def estimate_diameter(
    model, image, channel_axis=None, threshold=0.5, min_size=0, min_peak=0.0, **engine
) -> float | None:
    """Median equivalent diameter (px) of the objects in a centred window (at most 1024 x 1024)
    of the image's first plane; None when no object is found.

    A network splits objects far larger than its training size into pieces of about that
    size, so one pass at the image's own scale can be badly wrong. The window is segmented at
    the scales 1/8, 1/4, 1/2, 1 and 2 (those at which it is at least 4 model diameters
    across); of the scales at which the objects found measure near
    the model's own diameter (0.6 to 1.6 times), the largest estimate is kept (fragments are
    smaller than the objects they come from), and one more pass at the scale that estimate
    implies refines it, when it agrees (its objects, too, measure near the model's size).

    Returns
    -------
    float or None
    """
    plane = _first_plane_window(image, channel_axis)
    decoding = (threshold, min_size, min_peak)
    model_diameter = model.metadata.get("diameter")
    if not model_diameter:
        return _measured(model, plane, 1.0, decoding, engine)
    candidates = []
    for factor in _SEARCH_FACTORS:
        if min(plane.shape[-2:]) * factor < _WINDOW_OBJECTS * model_diameter:
            continue
        found = _measured(model, plane, factor, decoding, engine)
        if found is not None and _COMFORT[0] <= found * factor / model_diameter <= _COMFORT[1]:
            candidates.append(found)
    if not candidates:
        return None
    # fragments of large objects also measure near the model's size, at too large a scale:
    # the largest consistent estimate is the objects themselves
    estimate = max(candidates)
    factor = min(max(model_diameter / estimate, SMALLEST_FACTOR), LARGEST_FACTOR)
    refined = _measured(model, plane, factor, decoding, engine)
    consistent = (
        refined is not None and _COMFORT[0] <= refined * factor / model_diameter <= _COMFORT[1]
    )
    return refined if consistent else estimate


def _measured(model, plane, factor, decoding, engine) -> float | None:
    """Median object diameter, in the plane's own px, of a pass over ``plane`` (C, y, x) at
    ``factor``, decoded with ``decoding`` (threshold, min_size, min_peak) and no split."""
    from .metrics import median_diameter
    from .predict import predict_array

    working = plane if factor == 1.0 else Rescaled(plane, factor)
    if min(working.shape[-2:]) < 16:
        return None
    maps = predict_array(
        model, working, channel_axis=0, output=engine_output(model.config), **engine
    )
    threshold, min_size, min_peak = decoding
    labels = decode_plane(maps, threshold, min_size, model.config.output_mode, 0, min_peak)
    found = median_diameter([labels])
    return found / factor if found else None


def _first_plane_window(image, channel_axis) -> np.ndarray:
    """The centred window (at most 1024 px a side) of the first plane, shape (C, y, x)."""
    from .predict import PlaneView
    from .shapes import leading_shape

    plane = PlaneView(
        image, (0,) * len(leading_shape(tuple(image.shape), channel_axis)), channel_axis
    )
    rows, cols = (_centred(n, _ESTIMATE_WINDOW) for n in image.shape[-2:])
    return np.asarray(plane[:, rows, cols])


def _centred(length: int, size: int) -> slice:
    start = max(0, (length - size) // 2)
    return slice(start, start + size)


def relabel_plane(
    maps: np.ndarray,
    threshold: float,
    min_size: int,
    plane_shape: tuple[int, int],
    factor: float = 1.0,
    mode: str | None = None,
    split: int = 0,
    min_peak: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels and foreground probability of one plane from the network's maps: the
    step of :func:`segment` after the network, so new post-processing options need no forward
    pass.

    Parameters
    ----------
    maps : numpy.ndarray of float32, shape (Y', X') or (3, Y', X')
        :attr:`PlaneResult.maps`: foreground probability or class probabilities, at the
        working scale.
    threshold : float
    min_size : int
        Pixels, at the working scale.
    plane_shape : (int, int)
        (Y, X) of the original plane.
    factor : float
        Working scale / original scale (:attr:`SegmentEvent.factor`).
    mode : str, optional
        The model's output mode (``UNetConfig.output_mode``; :func:`.postprocess.decode_plane`).
    split : int
        Neck-splitting depth, px at the working scale; 0: no cuts
        (:func:`.postprocess.label_plane`).
    min_peak : float
        Object confidence floor; 0.0: every object is kept (:func:`.postprocess.decode_plane`).

    Returns
    -------
    labels : numpy.ndarray of uint32, shape (Y, X)
    probability : numpy.ndarray of float32, shape (Y, X)
    """
    labels = decode_plane(maps, threshold, min_size, mode, split, min_peak)
    probability = foreground_probability(maps)
    if factor != 1.0:
        labels, probability = back_to_original(labels, probability, plane_shape, factor)
    return labels, probability


class _Labeller:
    """Labels completed planes in a thread pool and hands them out in order."""

    def __init__(self, sink, leading, options, workers, plane_shape, diameter, factor, mode):
        self.sink, self.mode = sink, mode
        self.options = options
        self.leads = list(np.ndindex(*leading))
        self.workers = workers
        self.plane_shape, self.diameter, self.factor = plane_shape, diameter, factor

    def drain(self, events) -> Iterator[SegmentEvent]:
        from concurrent.futures import ThreadPoolExecutor

        queued: deque = deque()
        submitted = handed = 0
        last = None
        with ThreadPoolExecutor(self.workers, thread_name_prefix="labeller") as pool:
            try:
                for last in events:
                    if last.stopped:
                        break
                    while submitted < last.planes_done:
                        maps = self.sink.pop(submitted)
                        queued.append(pool.submit(self._label, submitted, maps))
                        submitted += 1
                    # Bound the planes held: wait for the oldest when the pool is saturated.
                    ready = self._ready(queued, block=len(queued) > self.workers + 1)
                    handed += len(ready)
                    yield self._event(last, handed, ready)
                if last is not None and last.stopped:
                    for future in queued:
                        future.cancel()
                    yield self._event(last, handed, (), stopped=True)
                    return
                ready = tuple(future.result() for future in queued)
                queued.clear()
                if ready or last is None:
                    handed += len(ready)
                    yield self._event(last, handed, ready)
            finally:
                for future in queued:
                    future.cancel()

    def _ready(self, queued: deque, block: bool) -> tuple[PlaneResult, ...]:
        ready = []
        while queued and (queued[0].done() or block):
            ready.append(queued.popleft().result())
            block = False
        return tuple(ready)

    def _label(self, index: int, maps: np.ndarray) -> PlaneResult:
        labels, probability = relabel_plane(
            maps,
            self.options.threshold,
            self.options.min_size,
            self.plane_shape,
            self.factor,
            self.mode,
            self.options.split,
            self.options.min_peak,
        )
        return PlaneResult(index, self.leads[index], labels, probability, int(labels.max()), maps)

    def _event(self, last, handed, ready, stopped=False) -> SegmentEvent:
        scale = {"diameter": self.diameter, "factor": self.factor}
        if last is None:  # an empty stack cannot happen (predict rejects it); keep types right
            return SegmentEvent(
                0, 0, handed, len(self.leads), (0, 0), tuple(ready), stopped, **scale
            )
        return SegmentEvent(
            last.done,
            last.total,
            handed,
            len(self.leads),
            last.tile_shape,
            tuple(ready),
            stopped,
            **scale,
        )


class PlaneBuffer:
    """Array-like target for the engine that keeps only the planes still being written.

    Parameters
    ----------
    leading : tuple of int
        Shape of the leading (plane) axes.
    plane_shape : (int, int)
    channels : int, optional
        Class maps per plane (engine ``output="classes"``); None for one foreground map.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, leading, plane_shape, channels: int | None = None):
        self.leading = tuple(leading)
        self.plane_shape = (() if channels is None else (channels,)) + tuple(plane_shape)
        self.shape = self.leading + self.plane_shape
        self.planes: dict[int, np.ndarray] = {}

    def __setitem__(self, key, value):
        lead = key[: len(self.leading)]
        index = int(np.ravel_multi_index(lead, self.leading)) if self.leading else 0
        plane = self.planes.get(index)
        if plane is None:
            plane = self.planes[index] = np.empty(self.plane_shape, np.float32)
        plane[key[len(self.leading) :]] = value

    def pop(self, index: int) -> np.ndarray:
        """The completed plane ``index`` (C order), released from the buffer."""
        return self.planes.pop(index)
