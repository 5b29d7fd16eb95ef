"""The Segment widget: an image layer in, a Labels layer out, computed in a worker thread."""

from __future__ import annotations

import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning

from ..core.predict import positive_or_auto
from ..core.shapes import output_shape
from ._layers import (
    Placement,
    colour_message,
    current_plane_index,
    is_lazy,
    model_input,
    plane_of,
)
from ._session import FROM_FILE, SESSION_MODELS, model_choices
from ._triton import keep_triton_out
from ._work import Failure, LazyProgress, notify_errors

SCOPES = ("whole stack", "current plane", "folder of files")
FOLDER = SCOPES[2]


@dataclass
class SegmentJob:
    """Everything a run needs, captured on the main thread when Segment is pressed."""

    layer: object  # the source image layer (results go back to it)
    name: str  # its name at the start of the run
    data: object  # model input, shape (..., [C,] Y, X)
    channel_axis: int | None
    model_path: Path
    options: dict  # tile, batch, device for the core engine
    threshold: float
    min_size: int
    split: int  # neck-splitting depth (px), 0: no cuts; see core.postprocess.label_plane
    min_peak: float  # object confidence floor, 0: keep all; see core.postprocess.decode_plane
    probabilities: bool
    placement: Placement
    plane: tuple | None = None  # leading index when only the current plane is segmented
    link_z: float | None = None  # IoU for linking objects across Z, or None
    measure: bool = False
    table: Path | None = None  # CSV of the measurements
    stop: threading.Event = field(default_factory=threading.Event)
    layer_removed: bool = False


@dataclass
class FolderJob:
    """A run over the image files of a folder into a folder of labels files."""

    name: str  # the input folder, for messages
    pairs: list  # (input file, labels file)
    images: list  # the opened inputs (core.io.LazyImage)
    model_path: Path
    options: dict  # engine and post-processing options of core.segment
    link_z: float | None
    measure: bool  # a NAME_labels.csv beside each labels file
    overwrite: bool
    stop: threading.Event = field(default_factory=threading.Event)
    layer: None = None
    layer_removed: bool = False


class SegmentWidget(Container):
    """Segment an image layer with a U-Net model into a ``<image name> labels`` layer."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        keep_triton_out()  # before torch first runs in this process (see _triton)
        self._viewer = napari_viewer
        self._image = create_widget(annotation="napari.layers.Image", label="image")
        self._channel_axis = ComboBox(label="channel axis", choices=self._channel_choices)
        self._model = ComboBox(label="model", choices=model_choices)
        self._model_file = FileEdit(label="model file", filter="*.safetensors", visible=False)
        self._device = ComboBox(
            label="device",
            choices=_device_choices,
            tooltip="auto: the first CUDA GPU if there is one, else the CPU",
        )
        self._tile = LineEdit(
            label="tile size", value="auto", tooltip="input tile in pixels, or auto"
        )
        self._batch = LineEdit(
            label="batch", value="auto", tooltip="tiles per forward pass, or auto"
        )
        self._threshold = FloatSpinBox(
            label="threshold",
            value=0.5,
            min=0.0,
            max=0.99,
            step=0.05,
            tooltip="probability (0-1) above which a pixel belongs to an object (to an object's "
            "interior for 3-class models); starts at the model's recommendation",
        )
        self._diameter = LineEdit(
            label="object diameter",
            value="auto",
            tooltip="typical object diameter in px, auto (estimated from the "
            "first plane) or none (segment the image as it is)",
        )
        self._min_size = SpinBox(
            label="min object size",
            value=0,
            min=0,
            max=10**7,
            tooltip="objects with fewer pixels (px, in the image's grid) are removed",
        )
        self._split = SpinBox(
            label="split touching (px)",
            value=0,
            min=0,
            max=50,
            tooltip="cut touching nuclei the threshold leaves joined: where a neck narrower "
            "than about 2 x this + 1 px joins them, and between two deep notches of an "
            "overlapping pair; 0: no cuts. 2-class models only; starts at the model's "
            "recommendation",
        )
        self._min_peak = FloatSpinBox(
            label="min object peak",
            value=0.0,
            min=0.0,
            max=1.0,
            step=0.005,  # three decimals: a tuned floor such as 0.925 is shown as it is
            tooltip="keep only objects whose probability reaches this somewhere (0-1): drops "
            "faint debris and haze that pass the threshold; 0: keep every object. Starts at "
            "the model's recommendation",
        )
        self._link_z = FloatSpinBox(
            label="link Z (IoU)",
            value=0.0,
            min=0.0,
            max=1.0,
            step=0.05,
            tooltip="0: off (ids restart in each plane). Otherwise an object continues the one in "
            "the Z plane before it that it overlaps with at least this IoU: one id per "
            "3D object (as cellpose's stitch_threshold)",
        )
        self._measure = CheckBox(text="measure objects (area, centroid, box, mean intensity)")
        self._table_file = FileEdit(
            label="save table to",
            mode="w",
            filter="*.csv",
            tooltip="optional: the measurements as a CSV file",
        )
        self._in_folder = FileEdit(
            label="input folder",
            mode="d",
            visible=False,
            tooltip="every .tif/.tiff file in it is segmented",
        )
        self._out_folder = FileEdit(
            label="output folder",
            mode="d",
            visible=False,
            tooltip="NAME_labels.tif (and NAME_labels.csv) per input",
        )
        self._replace = CheckBox(text="replace existing files", visible=False)
        self._probabilities = CheckBox(text="add a probability layer too")
        self._scope = ComboBox(label="scope", choices=SCOPES)
        self._keep = CheckBox(text="keep earlier results (new layer each run)")
        self._run = PushButton(text="Segment")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", visible=False)
        self.extend(
            [
                self._image,
                self._channel_axis,
                self._model,
                self._model_file,
                self._device,
                self._tile,
                self._batch,
                self._diameter,
                self._threshold,
                self._min_size,
                self._split,
                self._min_peak,
                self._link_z,
                self._measure,
                self._table_file,
                self._probabilities,
                self._scope,
                self._in_folder,
                self._out_folder,
                self._replace,
                self._keep,
                self._run,
                self._cancel,
                self._progress,
            ]
        )
        self._image.changed.connect(lambda *_: self._channel_axis.reset_choices())
        self._scope.changed.connect(self._on_scope_changed)
        self._model.changed.connect(self._on_model_changed)
        self._model_file.changed.connect(self._on_model_changed)
        self._run.changed.connect(self.start)
        self._cancel.changed.connect(self.cancel)
        self._threshold.changed.connect(self.relabel)
        self._min_size.changed.connect(self.relabel)
        self._split.changed.connect(self.relabel)
        self._min_peak.changed.connect(self.relabel)
        on_new_model = self._on_new_session_model
        SESSION_MODELS.changed.connect(on_new_model)
        # The registry outlives viewers: a closed widget must not be called back.
        self.native.destroyed.connect(lambda *_: SESSION_MODELS.changed.disconnect(on_new_model))
        self._results: dict[int, object] = {}  # id(image layer) -> its labels layer
        self._cache: RelabelCache | None = None  # the last run's network maps
        self._kept: dict = {}
        self._relabel_pending = False
        self._job: SegmentJob | None = None
        self._worker = None
        self._bar = None
        self._on_model_changed()

    @property
    def running(self) -> bool:
        return self._worker is not None

    def select_model(self, path) -> None:
        """Pick ``path`` in the model list (a session model or the bundled default)."""
        for _text, value in model_choices():
            if value != FROM_FILE and Path(value) == Path(path).resolve():
                self._model.value = value
                return
        self._model.value = FROM_FILE
        self._model_file.value = Path(path)

    def start(self, *_) -> None:
        """Check the form, capture the job and run it in a worker thread."""
        if self.running:
            return
        try:
            job = self._folder_job() if self._scope.value == FOLDER else self._job_from_form()
        except (ValueError, FileNotFoundError) as error:
            show_error(str(error))
            return
        self._cache, self._kept = None, {}
        self._run_worker(
            job, _segment_folder(job) if isinstance(job, FolderJob) else _segment(job, self._kept)
        )

    def relabel(self, *_) -> None:
        """Relabel the last result with the form's post-processing options from
        the kept network maps: no forward pass. Does nothing without a result of the selected
        image."""
        cache = self._cache
        if cache is None or cache.job.layer is not self._image.value:
            return
        if self.running:
            self._relabel_pending = True  # run when the current work ends
            return
        self._relabel_pending = False
        job = replace(
            cache.job,
            threshold=float(self._threshold.value),
            min_size=int(self._min_size.value),
            split=int(self._split.value),
            min_peak=float(self._min_peak.value),
            stop=threading.Event(),
        )
        self._run_worker(job, _relabel(job, cache))

    def _run_worker(self, job, worker) -> None:
        self._job, self._bar = job, LazyProgress(f"Segmenting {job.name}")
        worker.yielded.connect(self._on_progress)
        notify_errors(worker)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._worker = worker
        self._run.enabled, self._cancel.enabled = False, True
        self._progress.value, self._progress.visible = 0, True
        worker.start()

    def cancel(self, *_) -> None:
        """Stop the run after the current batch of tiles; nothing is added."""
        if self._job is not None:
            self._job.stop.set()

    def _on_model_changed(self, *_) -> None:
        """Show the file picker for "load from file", and take the model's recommended
        post-processing options (threshold, minimum object size, neck split, object floor)."""
        from ..core.config import UNetConfig
        from ..core.modelfile import read_header

        self._model_file.visible = self._model.value == FROM_FILE
        self._cache = None  # another model's maps cannot be relabelled as this model's
        try:
            header = read_header(self._model_path())
        except (ValueError, FileNotFoundError):
            return  # reported when Segment is pressed
        metadata = header["metadata"]
        # a model that records no training diameter cannot rescale: segment as it is
        self._diameter.value = "auto" if metadata.get("diameter") else "none"
        self._tile.tooltip = _tile_tooltip(header["config"])
        recommended = metadata.get("postprocess") or {}
        self._threshold.value = recommended.get("threshold", 0.5)
        self._min_size.value = recommended.get("min_size", 0)
        self._split.value = recommended.get("split", 0)
        self._min_peak.value = recommended.get("min_peak", 0.0)
        # 3-class models split objects from their own seeds
        self._split.enabled = UNetConfig.from_dict(header["config"]).output_mode == "paper"

    def _on_scope_changed(self, *_) -> None:
        folder = self._scope.value == FOLDER
        for widget in (self._in_folder, self._out_folder, self._replace):
            widget.visible = folder
        for widget in (
            self._image,
            self._channel_axis,
            self._probabilities,
            self._keep,
            self._table_file,
        ):
            widget.visible = not folder

    def _on_new_session_model(self) -> None:
        self._model.reset_choices()
        self._model.value = SESSION_MODELS.paths[0]  # a model just trained is ready to apply

    def _channel_choices(self, *_) -> list[str]:
        layer = self._image.value
        ndim = 0 if layer is None else np.ndim(layer.data[0] if layer.multiscale else layer.data)
        return ["auto", "none"] + [str(i) for i in range(max(ndim - 2, 0))]

    def _model_path(self) -> Path:
        value = self._model.value
        if value == FROM_FILE and _no_path(self._model_file.value):
            raise FileNotFoundError("model file: none picked; choose a .safetensors model file")
        path = Path(self._model_file.value) if value == FROM_FILE else Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"model: no such file: {path}")
        return path

    def _job_from_form(self) -> SegmentJob:
        from ..core.modelfile import read_header

        layer = self._image.value
        if layer is None:
            raise ValueError("image: no image layer to segment; open or select one")
        model_path = self._model_path()
        in_channels = int(read_header(model_path)["config"].get("in_channels", 1))
        data, axis = model_input(layer, self._channel_axis.value, in_channels)
        if said := colour_message(layer, in_channels):
            show_info(said)
        plane = None
        if self._scope.value == "current plane" and data.ndim - (axis is not None) > 2:
            plane = current_plane_index(layer, self._viewer.dims.point, axis)
        return SegmentJob(
            layer=layer,
            name=layer.name,
            data=data,
            channel_axis=axis,
            model_path=model_path,
            options={
                "tile": positive_or_auto("tile size", self._tile.value),
                "diameter": diameter_setting(self._diameter.value),
                "batch": positive_or_auto("batch", self._batch.value),
                "device": self._device.value,
            },
            threshold=float(self._threshold.value),
            min_size=int(self._min_size.value),
            split=int(self._split.value),
            min_peak=float(self._min_peak.value),
            probabilities=bool(self._probabilities.value),
            placement=Placement.of(layer, axis),
            plane=plane,
            link_z=self._checked_link_z(data.ndim - (axis is not None), plane),
            measure=bool(self._measure.value),
            table=self._checked_table(),
        )

    def _folder_job(self) -> FolderJob:
        """Every input opened and every output checked before any work."""
        from ..core.batch import batch_pairs, check_output_path, z_linker
        from ..core.io import read_tiff

        if _no_path(self._in_folder.value) or _no_path(self._out_folder.value):
            raise ValueError("input folder, output folder: pick both folders")
        model_path = self._model_path()
        pairs = batch_pairs([Path(self._in_folder.value)], Path(self._out_folder.value))
        images = [read_tiff(source, name=f"input {source.name}") for source, _ in pairs]
        link_z = self._link_z.value or None
        for (source, output), image in zip(pairs, images):
            z_linker(link_z, image.axes)
            for path in [output] + ([output.with_suffix(".csv")] if self._measure.value else []):
                check_output_path("output folder", path, [source, model_path], self._replace.value)
        options = {
            "tile": positive_or_auto("tile size", self._tile.value),
            "diameter": diameter_setting(self._diameter.value),
            "batch": positive_or_auto("batch", self._batch.value),
            "device": self._device.value,
            "threshold": float(self._threshold.value),
            "min_size": int(self._min_size.value),
            "split": int(self._split.value),
            "min_peak": float(self._min_peak.value),
        }
        return FolderJob(
            name=Path(self._in_folder.value).name,
            pairs=pairs,
            images=images,
            model_path=model_path,
            options=options,
            link_z=link_z,
            measure=bool(self._measure.value),
            overwrite=bool(self._replace.value),
        )

    def _checked_link_z(self, ndim: int, plane) -> float | None:
        if not self._link_z.value or plane is not None:
            return None
        if ndim < 3:
            raise ValueError(
                "link Z: expected a stack (a Z axis before Y, X); set it to 0 for a single plane"
            )
        return float(self._link_z.value)

    def _checked_table(self) -> Path | None:
        from ..core.batch import check_output_path

        if _no_path(self._table_file.value):
            return None
        if not self._measure.value:
            raise ValueError("save table to: tick 'measure objects' to write a table")
        path = Path(self._table_file.value)
        # the save dialog has asked before replacing a file
        check_output_path("save table to", path, [], overwrite=True, suffixes=(".csv",))
        return path

    def _on_progress(self, event) -> None:
        if isinstance(self._job, FolderJob):
            index, event = event
            self._progress.label = f"file {index + 1}/{len(self._job.pairs)}"
            event = event.step
        self._bar.update(event.done, event.total)
        self._progress.max, self._progress.value = max(event.total, 1), event.done

    def _on_layer_removed(self, event) -> None:
        # Only flags here: a notification raised inside napari's removal event crashed napari
        # (issue 14 #7); the warning is shown when the stopped worker returns.
        if self._job is not None and event.value is self._job.layer:
            self._job.layer_removed = True
            self._job.stop.set()

    def _on_returned(self, result) -> None:
        job = self._job
        if isinstance(result, Failure):
            show_error(result.message)
        elif isinstance(job, FolderJob):
            _report_folder(job, result)
        elif job.layer_removed:
            show_warning(f"image: layer {job.name!r} was removed; segmentation stopped")
        elif result is None:
            show_info(f"Segmentation of {job.name!r} cancelled; nothing was added")
        elif job.layer in self._viewer.layers:
            labels, probability, count, size, table = result
            layer = self._show_labels(job, labels)
            if table is not None:
                import pandas as pd

                layer.features = pd.DataFrame(table)
            if probability is not None:
                self._viewer.add_image(
                    probability,
                    name=f"{job.name} probability",
                    colormap="magma",
                    blending="additive",
                    **job.placement.layer_kwargs(),
                )
            show_info(f"{job.name}: {count} objects{_size_note(size)}")
            self._keep_cache()

    def _keep_cache(self) -> None:
        if "cache" in self._kept:
            self._cache = self._kept.pop("cache")

    def _on_finished(self) -> None:
        self._viewer.layers.events.removed.disconnect(self._on_layer_removed)
        self._bar.close()
        self._worker, self._job = None, None
        self._run.enabled, self._cancel.enabled = True, False
        self._progress.visible = False
        self._device.reset_choices()
        if self._relabel_pending:
            self.relabel()

    def _show_labels(self, job: SegmentJob, labels):
        previous = self._results.get(id(job.layer))
        if previous not in self._viewer.layers or self._keep.value:
            previous = None
        if job.plane is not None:
            labels = _into_stack(previous, job, labels)
        if previous is None:
            layer = self._viewer.add_labels(
                labels, name=f"{job.name} labels", **job.placement.layer_kwargs()
            )
            self._results[id(job.layer)] = layer
            return layer
        previous.data = labels
        previous.scale, previous.translate = job.placement.scale, job.placement.translate
        return previous


def _no_path(value) -> bool:
    """An empty file field (magicgui gives Path("."))."""
    return str(value).strip() in ("", ".")


def _report_folder(job: FolderJob, result) -> None:
    if result is None:
        show_info(
            f"Segmentation of folder {job.name!r} cancelled; files already finished were "
            f"kept, no partial file was written"
        )
        return
    objects = sum(count for _, count in result)
    show_info(
        f"{job.name}: {len(result)} files segmented, {objects} objects; labels in "
        f"{job.pairs[0][1].parent}"
    )


def _into_stack(previous, job: SegmentJob, plane_labels):
    """The whole-stack result with one plane replaced (the earlier result, or zeros)."""
    shape = output_shape(job.data.shape, job.channel_axis)
    if previous is not None and tuple(previous.data.shape) == shape:
        stack = previous.data
        if stack.dtype != plane_labels.dtype and np.can_cast(plane_labels.dtype, stack.dtype):
            plane_labels = plane_labels.astype(stack.dtype)
    else:
        stack = _allocate(shape, np.uint32, is_lazy(job.data), "labels")
    stack[job.plane] = plane_labels
    return stack


def _allocate(shape, dtype, lazy: bool, name: str):
    """A zero array; for lazy inputs a zarr store on disk, one chunk per plane."""
    if not lazy:
        return np.zeros(shape, dtype)
    import zarr

    folder = Path(tempfile.mkdtemp(prefix="tiled-unet-"))
    chunks = (1,) * (len(shape) - 2) + tuple(min(s, 2048) for s in shape[-2:])
    return zarr.open_array(
        str(folder / f"{name}.zarr"),
        mode="w",
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
    )


@dataclass
class RelabelCache:
    """The network's maps of the last run, so that a new threshold or minimum size relabels
    without the network (in memory, or a zarr store on disk for lazy inputs)."""

    job: SegmentJob
    maps: object  # dict lead -> maps, or an array of shape leading + maps shape
    leads: list
    plane_shape: tuple
    factor: float
    diameter: float | None
    mode: str  # the model's output mode (decoder)


@dataclass(frozen=True)
class RelabelProgress:
    done: int
    total: int


class _Collector:
    """Planes in order -> the run's results: labels (linked across Z when asked), probability,
    object count and measurements."""

    def __init__(self, job: SegmentJob, data, axis, shape, lazy: bool):
        from ..core.measure import MeasurementTable
        from ..core.postprocess import ZLinker

        self.shape, self.lazy = shape, lazy
        self.planes: dict = {}
        self.labels = _allocate(shape, np.uint32, True, "labels") if lazy else None
        self.probability = (
            _allocate(shape, np.float32, lazy, "probability") if job.probabilities else None
        )
        self.linker = None if job.link_z is None else ZLinker(job.link_z)
        self.table = MeasurementTable(data, axis, job.table, keep=True) if job.measure else None
        self.count = 0

    def add(self, index: int, lead: tuple, labels, probability, count: int) -> None:
        if self.linker is not None:
            labels = self.linker.link(labels, new_stack=lead[-1] == 0)
        if self.table is not None:
            self.table.add(index, lead, labels)
        self.count += count
        if self.probability is not None:
            self.probability[lead] = probability
        if self.lazy:
            self.labels[lead] = labels
        else:
            self.planes[lead] = labels

    def result(self, size):
        """(labels, probability or None, object count, size, measurements or None); ``size``
        is (object diameter, working scale) when a diameter was given or estimated."""
        if self.table is not None:
            self.table.commit()
        count = self.count if self.linker is None else self.linker.next_id - 1
        labels = self.labels if self.lazy else _stacked(self.planes, self.shape)
        return (
            labels,
            self.probability,
            count,
            size,
            None if self.table is None else self.table.columns,
        )

    def discard(self) -> None:
        if self.table is not None:
            self.table.discard()


def _job_input(job: SegmentJob):
    """(data, channel axis, shape without channels, lazy) of what the job segments."""
    data, axis = job.data, job.channel_axis
    if job.plane is not None:
        data, axis = plane_of(data, job.plane, axis)
    return data, axis, output_shape(data.shape, axis), is_lazy(job.data) and job.plane is None


# errors raised inside reach the user through notify_errors
@thread_worker(ignore_errors=True)
def _segment(job: SegmentJob, keep: dict):
    """Worker: drains the core segment step, yielding its events; returns the collected
    result (see :meth:`_Collector.result`), None when cancelled, or a Failure. The network's
    maps are kept in ``keep["cache"]`` for relabelling."""
    from ..core.modelfile import load_model
    from ..core.segment import segment

    data, axis, shape, lazy = _job_input(job)
    try:
        model = load_model(job.model_path)
        events = segment(
            model,
            data,
            channel_axis=axis,
            threshold=job.threshold,
            min_size=job.min_size,
            split=job.split,
            min_peak=job.min_peak,
            should_stop=job.stop.is_set,
            **job.options,
        )
    except (ValueError, FileNotFoundError) as error:
        return Failure(str(error))
    collector, maps, event = _Collector(job, data, axis, shape, lazy), None, None
    try:
        for event in events:
            if event.stopped:
                return None
            for plane in event.planes:
                maps = _kept(maps, shape[:-2], plane, lazy)
                collector.add(plane.index, plane.lead, plane.labels, plane.probability, plane.count)
            yield event
        result = collector.result(_size(event))
    finally:
        collector.discard()
    keep["cache"] = RelabelCache(
        job,
        maps,
        list(np.ndindex(*shape[:-2])),
        shape[-2:],
        event.factor,
        event.diameter,
        model.config.output_mode,
    )
    return result


def _size(step) -> tuple[float, float] | None:
    """(object diameter, working scale) of a segment step or relabel cache, if it had one."""
    if step is None or step.diameter is None:
        return None
    return step.diameter, step.factor


def _size_note(size) -> str:
    if size is None:
        return ""
    diameter, factor = size
    scale = "as it is" if factor == 1.0 else f"at {factor:.3g}x"
    return f" (object diameter {diameter:.0f} px, segmented {scale})"


def _kept(maps, leading, plane, lazy: bool):
    if maps is None:
        maps = (
            {}
            if not lazy
            else _allocate(tuple(leading) + plane.maps.shape, np.float32, True, "maps")
        )
    maps[plane.lead] = plane.maps
    return maps


# errors raised inside reach the user through notify_errors
@thread_worker(ignore_errors=True)
def _relabel(job: SegmentJob, cache: RelabelCache):
    """Worker: the cached maps relabelled with the job's post-processing options (no network);
    yields RelabelProgress, returns as :func:`_segment` does."""
    from ..core.segment import relabel_plane

    data, axis, shape, lazy = _job_input(job)
    collector = _Collector(job, data, axis, shape, lazy)
    try:
        for index, lead in enumerate(cache.leads):
            if job.stop.is_set():
                return None
            labels, probability = relabel_plane(
                np.asarray(cache.maps[lead]),
                job.threshold,
                job.min_size,
                cache.plane_shape,
                cache.factor,
                cache.mode,
                job.split,
                job.min_peak,
            )
            collector.add(index, lead, labels, probability, int(labels.max()))
            yield RelabelProgress(index + 1, len(cache.leads))
        return collector.result(_size(cache))
    finally:
        collector.discard()


# errors raised inside reach the user through notify_errors
@thread_worker(ignore_errors=True)
def _segment_folder(job: FolderJob):
    """Worker: each file through the core file step (the model loaded once), yielding
    (file index, event); returns [(file name, objects)], None when cancelled, or a Failure."""
    from ..core.batch import FileOutputs, segment_file
    from ..core.modelfile import load_model

    try:
        model = load_model(job.model_path)
    except (ValueError, FileNotFoundError) as error:
        return Failure(str(error))
    done = []
    for index, ((source, output), image) in enumerate(zip(job.pairs, job.images)):
        outputs = FileOutputs(output, table=output.with_suffix(".csv") if job.measure else None)
        try:
            events = segment_file(
                model,
                image,
                outputs,
                channel_axis=image.channel_axis,
                link_z=job.link_z,
                overwrite=job.overwrite,
                should_stop=job.stop.is_set,
                **job.options,
            )
            for event in events:
                if event.stopped:
                    return None
                yield index, event
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            return Failure(
                f"{source.name}: {error} ({len(done)} files finished before it were kept)"
            )
        done.append((source.name, event.objects if event.linked is None else event.linked))
    return done


def diameter_setting(text: str):
    """The diameter field: "auto", "none" (None) or a positive number of pixels."""
    text = str(text).strip().lower()
    if text in ("auto", "none", ""):
        return None if text in ("none", "") else "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(
            f"object diameter: expected a positive number of pixels, auto or none, got {text!r}"
        )
    return value


def _stacked(planes: dict, shape):
    """The planes in one array of at least uint16, so that a user correcting the result can
    paint ids beyond the largest found."""
    from ..core.postprocess import labels_dtype

    largest = max((int(p.max()) for p in planes.values()), default=0)
    labels = np.zeros(shape, labels_dtype(max(largest, np.iinfo(np.uint8).max + 1)))
    for lead, plane in planes.items():
        labels[lead] = plane
    return labels


def _tile_tooltip(config: dict) -> str:
    from ..core.config import ConfigGeometry, UNetConfig
    from ..core.predict import smallest_tile

    smallest = smallest_tile(ConfigGeometry(UNetConfig.from_dict(config)))
    return (
        f"input tile in pixels, or auto (fastest). This model: at least {smallest} px; "
        f"smaller values are raised to it"
    )


def _device_choices(*_) -> list[str]:
    # torch is imported when work first runs, not when the widget opens; after that the
    # list names each CUDA device found.
    choices = ["auto", "cpu"]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return choices
