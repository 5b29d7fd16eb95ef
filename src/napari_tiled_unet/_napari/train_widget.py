"""The Train widget: (image, labels) layer pairs in, a model file out, with a live plot."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning

from ..core.presets import FINE_TUNE, SCRATCH, SCRATCH_ARCHITECTURE
from ..core.shapes import output_shape
from ..core.weights import VARIANT_DEFAULTS
from ..models import DEFAULT_MODEL
from ._layers import full_resolution, model_input
from ._session import SESSION_MODELS
from ._triton import keep_triton_out
from ._work import Failure, LazyProgress, notify_errors

STARTS = ("scratch", "bundled default", "file")
# (shown, core.config mode) of each output the widget offers
OUTPUTS = (
    ("2 classes (the paper's)", "paper"),
    ("3 classes: boundary", "boundary"),
    ("foreground + distance", "distance"),
)
# the presets of core.presets: what each start means for the settings
PRESET_OF_START = {"scratch": SCRATCH, "bundled default": FINE_TUNE, "file": FINE_TUNE}
MODEL_FOLDER = Path.home() / "napari-tiled-unet" / "models"


@dataclass
class TrainJob:
    """Arrays and settings captured on the main thread when Train is pressed."""

    samples: list  # core.train.Sample
    output: Path
    config: object  # core.train.TrainConfig
    init: Path | None
    in_channels: int
    mode: str
    stop: threading.Event = field(default_factory=threading.Event)


class TrainWidget(Container):
    """Train a U-Net from image + Labels layers with the border-weighted loss."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        keep_triton_out()  # before torch first runs in this process (see _triton)
        self._viewer = napari_viewer
        self._image = create_widget(annotation="napari.layers.Image", label="image")
        self._labels_layer = create_widget(annotation="napari.layers.Labels", label="labels")
        self._add_pair = PushButton(text="Add pair")
        self._clear_pairs = PushButton(text="Clear pairs")
        self._pairs_text = Label(value="training on: the image and labels above")
        self._regions = create_widget(
            annotation="napari.layers.Shapes",
            label="annotated regions",
            options={
                "nullable": True,
                "tooltip": "fully annotated regions; outside them pixels are ignored",
            },
        )
        self._ignore = SpinBox(
            label="ignore label",
            value=0,
            min=0,
            max=2**31 - 1,
            tooltip="label id ignored by the loss (0 = none)",
        )
        paper_w0, paper_sigma = VARIANT_DEFAULTS["paper"]
        self._w0 = FloatSpinBox(
            label="w0",
            value=paper_w0,
            min=0.0,
            max=1000.0,
            tooltip="extra loss weight of background pixels between two objects (unitless; "
            "paper: 10), so touching objects are learnt apart",
        )
        self._sigma = FloatSpinBox(
            label="sigma",
            value=paper_sigma,
            min=0.01,
            max=1000.0,
            tooltip="how far (px) from the two nearest objects that weight reaches (paper: 5 px)",
        )
        self._physical = CheckBox(text="sigma in the layer's units (scale)")
        self._iterations = SpinBox(label="iterations", value=SCRATCH.iterations, min=1, max=10**7)
        self._lr = FloatSpinBox(
            label="learning rate",
            value=SCRATCH.lr,
            min=1e-7,
            max=1.0,
            step=1e-5,
            tooltip="Adam, decaying to 0 over the run (cosine)",
        )
        self._batch = SpinBox(label="batch", value=4, min=1, max=256, tooltip="patches per step")
        self._patch = SpinBox(
            label="patch size", value=252, min=16, max=4096, tooltip="input patch side in px"
        )
        self._val_fraction = FloatSpinBox(
            label="validation fraction", value=0.1, min=0.0, max=0.9, step=0.05
        )
        self._start_from = ComboBox(label="start from", choices=STARTS)
        self._init_file = FileEdit(label="initial model", filter="*.safetensors", visible=False)
        self._mode = ComboBox(
            label="output",
            choices=OUTPUTS,
            value="paper",
            tooltip="what the network learns: the paper's background / foreground (touching "
            "objects apart by a gap), background / interior / boundary (split by watershed from "
            "the interiors), or foreground and a distance map (split by watershed from its "
            "peaks). Starting from a model: its own; another rebuilds its output layer",
        )
        self._output = FileEdit(
            label="save model as",
            mode="w",
            filter="*.safetensors",
            tooltip=f"default: a new file in {MODEL_FOLDER}",
        )
        self._overwrite = CheckBox(text="overwrite an existing model file")
        self._train = PushButton(text="Train")
        self._stop = PushButton(text="Stop (keeps the best model)", enabled=False)
        self.extend(
            [
                self._image,
                self._labels_layer,
                self._add_pair,
                self._clear_pairs,
                self._pairs_text,
                self._regions,
                self._ignore,
                self._w0,
                self._sigma,
                self._physical,
                self._iterations,
                self._lr,
                self._batch,
                self._patch,
                self._val_fraction,
                self._start_from,
                self._init_file,
                self._mode,
                self._output,
                self._overwrite,
                self._train,
                self._stop,
            ]
        )
        self.plot = TrainingPlot()
        self.native.layout().addWidget(self.plot.canvas)
        self._pairs: list[tuple] = []
        self._add_pair.changed.connect(self._on_add_pair)
        self._clear_pairs.changed.connect(self._on_clear_pairs)
        self._start_from.changed.connect(self._on_start_changed)
        self._init_file.changed.connect(self._show_start_mode)
        self._train.changed.connect(self.start)
        self._stop.changed.connect(self.stop)
        self._job: TrainJob | None = None
        self._worker = None
        self._bar = None
        self.last_event = None

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, *_) -> None:
        """Check the form, copy the annotations and train in a worker thread."""
        if self.running:
            return
        try:
            job = self._job_from_form()
        except (ValueError, FileNotFoundError) as error:
            show_error(str(error))
            return
        self._job, self.last_event, self._bar = job, None, LazyProgress("Training")
        self.plot.clear()
        worker = _train(job)
        worker.yielded.connect(self._on_event)
        notify_errors(worker)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._train.enabled, self._stop.enabled = False, True
        worker.start()

    def stop(self, *_) -> None:
        """Stop after the current iteration; the best model so far is kept."""
        if self._job is not None:
            self._job.stop.set()

    def _on_start_changed(self, start: str) -> None:
        self._init_file.visible = start == "file"
        preset = PRESET_OF_START[start]
        self._lr.value, self._iterations.value = preset.lr, preset.iterations
        self._show_start_mode()

    def _show_start_mode(self, *_) -> None:
        """Offer the output of the model training starts from (the paper's from scratch)."""
        from ..core.config import UNetConfig
        from ..core.modelfile import read_header

        try:
            init = self._init_path()
            header = read_header(init) if init is not None else None
        except (ValueError, OSError):  # not a model file (yet): the start reports it at Train
            return
        config = UNetConfig.from_dict(header["config"]) if header else None
        self._mode.value = config.output_mode if config else "paper"

    def _on_add_pair(self, *_) -> None:
        image, labels = self._image.value, self._labels_layer.value
        if image is None or labels is None:
            show_error("pairs: choose an image layer and a labels layer to add")
            return
        self._pairs.append((image, labels, self._regions.value))
        self._pairs_text.value = "training on: " + "; ".join(
            f"{image.name} + {labels.name}" for image, labels, _ in self._pairs
        )

    def _on_clear_pairs(self, *_) -> None:
        self._pairs = []
        self._pairs_text.value = "training on: the image and labels above"

    def _job_from_form(self) -> TrainJob:
        from ..core.modelfile import read_header
        from ..core.train import TrainConfig

        init = self._init_path()
        in_channels = 1 if init is None else int(read_header(init)["config"].get("in_channels", 1))
        pairs = self._pairs or [(self._image.value, self._labels_layer.value, self._regions.value)]
        samples = [_sample(image, labels, regions, in_channels) for image, labels, regions in pairs]
        config = TrainConfig(
            iterations=self._iterations.value,
            batch=self._batch.value,
            patch=self._patch.value,
            lr=self._lr.value,
            lr_schedule=PRESET_OF_START[self._start_from.value].lr_schedule,
            anchor=PRESET_OF_START[self._start_from.value].anchor,
            w0=self._w0.value,
            sigma=self._sigma.value,
            pixel_size=_pixel_size(pairs[0][0]) if self._physical.value else None,
            ignore_label=self._ignore.value or None,
            val_fraction=self._val_fraction.value,
            validate_every=max(1, min(100, self._iterations.value // 10)),
        )
        output = self._output_path(pairs[0][0].name)
        return TrainJob(samples, output, config, init, in_channels, self._mode.value)

    def _init_path(self) -> Path | None:
        start = self._start_from.value
        path = (
            None
            if start == "scratch"
            else DEFAULT_MODEL
            if start == "bundled default"
            else Path(self._init_file.value)
        )
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"start from: no such model file: {path}")
        return path

    def _output_path(self, image_name: str) -> Path:
        chosen = str(self._output.value).strip()
        if chosen in ("", "."):
            MODEL_FOLDER.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            return MODEL_FOLDER / f"{_safe_name(image_name)}-{stamp}.safetensors"
        path = Path(chosen)
        if path.exists() and not self._overwrite.value:
            raise ValueError(f"save model as: {path} exists; choose another name or tick overwrite")
        if not path.parent.is_dir():
            raise ValueError(f"save model as: folder {path.parent} does not exist")
        return path

    def _on_event(self, event) -> None:
        if self.last_event is None and event.data is not None:
            _tell_what_is_used(event.data)
        self._bar.update(event.iteration, event.iterations)
        self.last_event = event
        self.plot.add(event)

    def _on_returned(self, result) -> None:
        if isinstance(result, Failure):
            show_error(result.message)
            return
        output = self._job.output
        if not output.is_file():
            return
        best = (result.best or {}) if result is not None else {}
        state = "stopped" if result is not None and result.stopped else "done"
        score = best.get("ap50", float("nan"))
        if result is not None and result.kept_start:
            show_warning(
                f"Training {state}; fine-tuning did not beat {self._start_name()} on "
                f"validation (AP@0.5 {score:.3f}, pixel IoU {best.get('iou', float('nan')):.3f}; "
                f"it takes {result.beats_start}), so {output} holds that starting model. The "
                f"Segment widget's selection is unchanged; annotate more objects to improve it."
            )
        else:
            SESSION_MODELS.add(output)
            message = (
                f"Training {state}; model saved to {output} (validation AP@0.5 {score:.3f}); "
                f"it is selected in the Segment widget"
            )
            if score > 0:
                show_info(message)
            else:
                show_warning(
                    f"{message}. It finds no validation object yet: annotate more "
                    f"objects, or train longer."
                )

    def _start_name(self) -> str:
        """What the finished fine-tuning started from, as its warning names it."""
        from ..core.train import rebuilt_start_name

        remedy = "more iterations or a higher learning rate"
        rebuilt = rebuilt_start_name(self._job.init, self._job.mode, remedy)
        return rebuilt or "the model it started from"

    def _on_finished(self) -> None:
        self._bar.close()
        self._worker, self._job = None, None
        self._train.enabled, self._stop.enabled = True, False
        self.plot.draw()


class TrainingPlot:
    """Training loss and validation IoU / AP@0.5 against iterations (matplotlib in the dock)."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        self.loss_axes = self.figure.add_subplot(2, 1, 1)
        self.metric_axes = self.figure.add_subplot(2, 1, 2)
        self.updates = 0
        self.clear()

    def clear(self) -> None:
        self.iterations, self.losses = [], []
        self.validations: list[tuple[int, float, float]] = []
        self._drawn = 0.0
        self.draw()

    def add(self, event) -> None:
        self.iterations.append(event.iteration)
        self.losses.append(event.loss)
        if event.metrics:
            self.validations.append((event.iteration, event.metrics["iou"], event.metrics["ap50"]))
        # Redrawing costs tens of ms: at most a few times a second, and at each validation.
        if event.metrics or time.monotonic() - self._drawn > 0.5:
            self.draw()

    def draw(self) -> None:
        self.loss_axes.clear()
        self.loss_axes.plot(self.iterations, self.losses, color="0.6", linewidth=0.8, label="loss")
        if len(self.losses) >= 10:
            smooth = np.convolve(self.losses, np.ones(10) / 10, mode="valid")
            self.loss_axes.plot(self.iterations[9:], smooth, color="C0", label="loss (mean of 10)")
        self.loss_axes.set_ylabel("training loss")
        self.metric_axes.clear()
        if self.validations:
            its, iou, ap = zip(*self.validations)
            self.metric_axes.plot(its, iou, "o-", color="C1", label="IoU")
            self.metric_axes.plot(its, ap, "s-", color="C2", label="AP@0.5")
            self.metric_axes.legend(loc="lower right", fontsize="small")
        self.metric_axes.set_ylim(0, 1)
        self.metric_axes.set_xlabel("iteration")
        self.metric_axes.set_ylabel("validation")
        self.canvas.draw_idle()
        self.updates += 1
        self._drawn = time.monotonic()


_FEW_OBJECTS = 10


def _tell_what_is_used(data) -> None:
    """What the run learns from; a warning when it is too little to judge the result by."""
    text = data.describe()
    if not data.held_out or data.train_objects < _FEW_OBJECTS:
        show_warning(
            f"Training: {text}. The validation score will say little about new "
            f"images: annotate more objects, or add another image."
        )
    else:
        show_info(f"Training: {text}")


# errors raised inside reach the user through notify_errors
@thread_worker(ignore_errors=True)
def _train(job: TrainJob):
    """Worker: yields TrainEvents; returns the last one, or a Failure for bad input."""
    from ..core.train import train

    # The bundled model's architecture: fast on CPUs, and batch norm trains quickly from scratch.
    model_config = (
        None
        if job.init
        else replace(SCRATCH_ARCHITECTURE, in_channels=job.in_channels).with_mode(job.mode)
    )
    try:
        events = train(
            job.samples,
            job.output,
            config=job.config,
            model_config=model_config,
            init=job.init,
            mode=job.mode if job.init else None,
            should_stop=job.stop.is_set,
        )
    except (ValueError, FileNotFoundError) as error:
        return Failure(str(error))
    last = None
    for last in events:
        yield last
    return last


def _sample(image_layer, labels_layer, regions_layer, in_channels: int):
    from ..core.train import Sample

    if image_layer is None or labels_layer is None:
        raise ValueError("labels: choose an image layer and the labels layer annotating it")
    data, axis = model_input(image_layer, "auto", in_channels)
    labels = np.array(full_resolution(labels_layer))  # a copy: painting goes on during training
    spatial = output_shape(data.shape, axis)
    if labels.shape != spatial:
        raise ValueError(
            f"labels: layer {labels_layer.name!r} has shape {labels.shape}, expected the "
            f"shape of image {image_layer.name!r} {spatial}"
        )
    region = None
    if regions_layer is not None:
        region = regions_layer.to_labels(labels_shape=labels.shape) > 0
    return Sample(np.asarray(data), labels, region, axis)


def _pixel_size(layer) -> float:
    y, x = (float(s) for s in layer.scale[-2:])
    if not np.isclose(y, x):
        raise ValueError(
            f"sigma units: the layer's pixels are not square (scale Y {y}, X {x}); "
            f"give sigma in pixels"
        )
    return x


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "model"
