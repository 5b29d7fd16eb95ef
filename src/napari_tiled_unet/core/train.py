"""Training from annotations with the border-weighted loss, as a generator of progress events.

Data are (image, labels[, region]) samples; images may be stacks, of which only annotated planes
are used. Label 0 is background inside the region (the whole plane without one) and ignored
outside it; an optional ignore label is ignored everywhere. Patches are drawn with a bias
towards foreground, augmented on the device, and the loss is the weighted softmax
cross-entropy on the valid output of the network. The best model by validation is written
atomically after each validation, so stopping at any time leaves a loadable model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .augment import Augmentation
from .metrics import diameter_range, median_diameter
from .model import UNet, UNetConfig, with_output_mode
from .normalize import Normalization
from .presets import FINE_TUNE, SCRATCH
from .targets import engine_output
from .tiling import mirror_indices
from .weights import border_weight_map, separate_touching

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
VAL_SPLITS = ("auto", "image", "plane")


@dataclass
class Sample:
    """One annotated image.

    Attributes
    ----------
    image : numpy.ndarray, shape (..., Y, X), or (..., C, Y, X) with ``channel_axis``
    labels : numpy.ndarray of int, shape of the image without its channel axis
        Instance ids; 0 = background (inside ``region``).
    region : numpy.ndarray of bool, optional, shape of ``labels``
        Where the annotation is complete; outside it pixels are ignored.
    channel_axis : int, optional
    """

    image: np.ndarray
    labels: np.ndarray
    region: np.ndarray | None = None
    channel_axis: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (defaults: the paper's loss, and the from-scratch preset of
    :mod:`.presets`; :meth:`fine_tuning` gives the fine-tuning one).

    ``w0`` and ``sigma`` left as None take the ``weights`` variant's own values
    (:data:`~.weights.VARIANT_DEFAULTS`: paper 10 / 5 px, Fiji 50 / 6 px).
    """

    iterations: int = SCRATCH.iterations
    batch: int = 4
    patch: int = 252
    lr: float = SCRATCH.lr
    optimizer: str = "adam"
    lr_schedule: str = SCRATCH.lr_schedule
    w0: float | None = None
    sigma: float | None = None
    weights: str = "paper"
    class_balance: bool = True
    pixel_size: float | None = None
    ignore_label: int | None = None
    val_fraction: float = 0.1
    val_split: str = "auto"
    validate_every: int = SCRATCH.validate_every
    anchor: float = SCRATCH.anchor
    foreground_bias: float = 10.0
    augmentation: Augmentation = field(default_factory=Augmentation)
    normalization: Normalization = field(default_factory=Normalization)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        from .weights import VARIANT_DEFAULTS

        w0, sigma = VARIANT_DEFAULTS.get(self.weights, VARIANT_DEFAULTS["paper"])
        if self.w0 is None:
            object.__setattr__(self, "w0", w0)
        if self.sigma is None:
            object.__setattr__(self, "sigma", sigma)

    @classmethod
    def fine_tuning(cls, **settings) -> TrainConfig:
        """Settings for fine-tuning a trained model: the fine-tuning preset, then ``settings``."""
        return cls(**{**asdict(FINE_TUNE), **settings})


@dataclass(frozen=True)
class TrainEvent:
    """Progress of a training run.

    Attributes
    ----------
    iteration, iterations : int
    loss : float
        Training loss of this iteration's batch.
    metrics : dict or None
        Validation metrics (``iou``, ``ap50``, ``f1``) when this event follows a validation.
    best : dict or None
        Best validation so far (with its ``iteration``).
    seconds : float
        Wall time since the start.
    stopped : bool
        True on the last event when ``should_stop`` ended the run.
    data : DataSummary or None
        What the run trains and validates on.
    baseline : dict or None
        Validation metrics of the model fine-tuning started from (``init``), before training.
    """

    iteration: int
    iterations: int
    loss: float
    metrics: dict | None
    best: dict | None
    seconds: float
    stopped: bool = False
    data: DataSummary | None = None
    baseline: dict | None = None

    @property
    def kept_start(self) -> bool:
        """Fine-tuning has not beaten the model it started from on validation: the output
        file holds that starting model (``best`` is its score, iteration 0)."""
        return bool(self.baseline and self.best and self.best.get("iteration") == 0)

    @property
    def beats_start(self) -> str:
        """What a fine-tuned model of this run must show to replace its start, in words."""
        return beats_start(self.data.val_objects if self.data else 0)


@dataclass(frozen=True)
class DataSummary:
    """Annotated planes and objects a run trains and validates on.

    ``held_out`` is False when nothing could be held out (one small annotated area): validation
    then scores the training data, which says little about new images.
    """

    train_planes: int
    train_objects: int
    val_planes: int
    val_objects: int
    held_out: bool

    def describe(self) -> str:
        where = (
            f"validating on {self.val_objects} other objects in {self.val_planes} plane(s)"
            if self.held_out
            else "validating on the same objects (nothing could be held out)"
        )
        return f"training on {self.train_objects} objects in {self.train_planes} plane(s), {where}"


@dataclass
class TrainingPlane:
    """One annotated plane, prepared for training."""

    source: tuple  # (sample index, leading index of the plane in its stack)
    image: np.ndarray  # (C, Y, X) float32, normalised
    ids: np.ndarray  # (Y, X) int64 instance ids (paper mode: touching objects gapped)
    weights: np.ndarray  # (Y, X) float32, 0 = ignored
    truth: np.ndarray  # (Y, X) instance ids inside the region, for validation
    foreground: np.ndarray  # (K, 2) coordinates of foreground pixels
    # (Y, X) bool, held-out objects' planes only: the annotated area over which a predicted
    # object that reaches them is scored whole
    annotated: np.ndarray | None = None


def train(
    samples: Sequence[Sample],
    output,
    *,
    config: TrainConfig = TrainConfig(),
    model_config: UNetConfig | None = None,
    init=None,
    mode: str | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[TrainEvent]:
    """Train a U-Net on ``samples`` and write the best model to ``output``.

    Arguments are checked, and the annotated planes prepared, when this function is called;
    training runs as the returned generator is consumed.

    Parameters
    ----------
    samples : sequence of Sample
    output : str or Path
        Model file written (atomically) after each validation that improves, and at a stop.
    config : TrainConfig
    model_config : UNetConfig, optional
        Architecture for training from scratch (default: depth 3, 16 base channels).
    init : str or Path, optional
        Model file to fine-tune from (its architecture and normalisation are kept).
    mode : {"paper", "boundary", "distance"}, optional
        Output mode of the model fine-tuned from ``init`` (:mod:`.targets`); None keeps
        ``init``'s. Another mode keeps ``init``'s network and rebuilds its output layer
        (:func:`~.model.with_output_mode`).
    resume : bool
        Continue an earlier run into the same ``output`` from its checkpoint
        (:func:`checkpoint_path`): weights, optimizer state, iteration and best validation.
        ``config.iterations`` is the total, counted from that run's start.
    should_stop : callable, optional
        Polled every iteration; a stop saves the model and yields a last event.

    Returns
    -------
    generator of TrainEvent
    """
    if mode is not None and (init is None or resume):
        raise ValueError(
            f"mode: changes the outputs of a model fine-tuned from init; got {mode!r} with "
            + ("resume (a resumed run keeps its model)" if resume else "no init")
        )
    session = _Session.prepared(
        samples,
        Path(output),
        config,
        _Start(model_config, init, mode),
        resume,
        should_stop or (lambda: False),
    )
    return session.run()


def checkpoint_path(output) -> Path:
    """Where a run writing ``output`` keeps its resumable state (beside the model file)."""
    output = Path(output)
    return output.with_name(output.stem + ".checkpoint.pt")


@dataclass
class _Session:
    model: UNet
    train_planes: list
    val_planes: list
    output: Path
    config: TrainConfig
    should_stop: Callable[[], bool]
    resumed: dict | None = None
    fine_tuning: bool = False
    held_out: bool = True
    baseline: dict | None = None
    start_weights: dict | None = None  # the L2-SP anchor of a fine-tuning run

    @cached_property
    def min_gain(self) -> float:
        """The IoU gain over the start that counts on this run's validation objects."""
        return min_iou_gain(self.data.val_objects)

    @cached_property
    def data(self) -> DataSummary:
        return DataSummary(
            len(self.train_planes),
            _object_count(self.train_planes),
            len(self.val_planes),
            _object_count(self.val_planes),
            self.held_out,
        )

    @cached_property
    def diameter(self) -> float:
        """Median equivalent diameter (px) of the training objects: the model's object size.
        A fine-tuned model keeps its parent's, which its weights were tuned to."""
        previous = dict(self.model.metadata)
        if previous.get("diameter"):
            return float(previous["diameter"])
        return median_diameter([p.truth for p in self.train_planes])

    @cached_property
    def diameter_range(self) -> list[float]:
        """The object sizes (px) the network saw often in training, scale augmentation included
        (:func:`~.metrics.diameter_range`). A fine-tuned model keeps its parent's."""
        previous = dict(self.model.metadata)
        if previous.get("diameter_range"):
            return [float(d) for d in previous["diameter_range"]]
        zoom = self.config.augmentation.zoom
        return list(diameter_range([p.truth for p in self.train_planes], zoom))

    @classmethod
    def prepared(cls, samples, output, config, start: _Start, resume, should_stop):
        import torch

        _check_config(config)
        resumed = _read_checkpoint(output) if resume else None
        _check_resumable_pull(resumed, config, output)
        torch.manual_seed(config.seed)  # the initial weights are part of a seeded run
        model = start.model() if resumed is None else resumed["model"]
        if start.init is not None or (resumed is not None and "normalization" in resumed):
            # the weights were trained on inputs scaled this way
            config = replace(config, normalization=model.normalization)
        _check_patch(model, config.patch)
        if not output.parent.is_dir():
            raise ValueError(f"output: folder {output.parent} does not exist")
        planes = annotated_planes(samples, config, model)  # also checks the output mode
        if not planes:
            raise ValueError(
                "labels: no annotated plane (every plane is empty or outside its region)"
            )
        train_planes, val_planes = _split(_group(planes), config)
        held_out = val_planes is not train_planes
        fine_tuning = (
            start.init is not None if resumed is None else bool(resumed.get("fine_tuning"))
        )
        if resumed is not None:
            start_weights = resumed.get("start_weights")
        elif fine_tuning:
            start_weights = start.anchored(model)
        else:
            start_weights = None
        return cls(
            model,
            train_planes,
            val_planes,
            output,
            config,
            should_stop,
            resumed,
            # a resumed run goes on as what it was: fine-tuning keeps its guard and statistics
            fine_tuning=fine_tuning,
            held_out=held_out,
            start_weights=start_weights,
        )

    def run(self) -> Iterator[TrainEvent]:
        import torch

        from .predict import resolve_device

        config, start = self.config, time.perf_counter()
        device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        model = self.model.to(device)
        if self.start_weights:
            self.start_weights = {k: v.to(device) for k, v in self.start_weights.items()}
        self._train_mode(model)
        optimizer = _optimizer(model, config)
        first, best = 1, None
        if self.resumed:
            optimizer.load_state_dict(self.resumed["optimizer"])
            first, best = self.resumed["iteration"] + 1, self.resumed["best"]
            self.baseline = self.resumed.get("baseline")
        elif self.fine_tuning:
            # The model fine-tuning starts from, scored on the same validation data, is the
            # output until a fine-tuned one validates better: a run never leaves a worse model.
            self.baseline = best = dict(self._validate(model, device), iteration=0)
            self._save(model, 0, best)
        context: dict[str, Any] = {"data": self.data, "baseline": self.baseline}
        loss = float("nan")
        for iteration in range(first, config.iterations + 1):
            if self.should_stop():
                if best is None:  # nothing written yet: keep what was learnt so far
                    self._save(model, iteration - 1, None)
                self._checkpoint(model, optimizer, iteration - 1, best)
                yield TrainEvent(
                    iteration - 1,
                    config.iterations,
                    loss,
                    None,
                    best,
                    time.perf_counter() - start,
                    stopped=True,
                    **context,
                )
                return
            _set_learning_rate(optimizer, config, iteration)
            loss = self._step(model, optimizer, rng, generator, device)
            metrics = None
            if iteration % config.validate_every == 0 or iteration == config.iterations:
                metrics = dict(self._validate(model, device), iteration=iteration)
                if _improves(metrics, best, self.baseline, self.min_gain):
                    best = metrics
                    self._save(model, iteration, best)
                self._checkpoint(model, optimizer, iteration, best)
            yield TrainEvent(
                iteration,
                config.iterations,
                loss,
                metrics,
                best,
                time.perf_counter() - start,
                **context,
            )

    def _step(self, model, optimizer, rng, generator, device) -> float:
        import torch

        from .augment import augment
        from .loss import distance_loss, weighted_cross_entropy
        from .targets import class_target, distance_target

        image, ids, weights = _batch(self.train_planes, self.config, rng)
        image, ids, weights = augment(
            torch.from_numpy(image).to(device),
            torch.from_numpy(ids).to(device),
            torch.from_numpy(weights).to(device),
            self.config.augmentation,
            generator,
        )
        distance = model.config.output_mode == "distance"
        target = class_target(ids, 2 if distance else model.config.n_classes)
        crop = model.margin // 2
        inner = (
            slice(None),
            slice(crop, target.shape[-2] - crop),
            slice(crop, target.shape[-1] - crop),
        )
        logits = model(image)
        loss = weighted_cross_entropy(
            logits[:, :2] if distance else logits, target[inner], weights[inner]
        )
        if distance:
            loss = loss + distance_loss(
                logits[:, 2], distance_target(ids)[inner], weights[inner] > 0
            )
        optimizer.zero_grad(set_to_none=True)
        (loss + self._pull_to_start(model)).backward()
        optimizer.step()
        return loss.item()

    def _pull_to_start(self, model):
        """The L2-SP term of a fine-tuning run (``config.anchor``; 0 when there is none): few
        annotations then adjust the starting model instead of replacing what it knew."""
        if not self.config.anchor or not self.start_weights:
            return 0.0
        return self.config.anchor * sum(
            ((weight - self.start_weights[name]) ** 2).sum()
            for name, weight in model.named_parameters()
            if name in self.start_weights
        )

    def _train_mode(self, model) -> None:
        """Train mode; when fine-tuning, batch normalisation keeps the statistics the model
        was trained with. A few annotated nuclei would otherwise replace them in a few dozen
        steps: measured with bench_finetune.py, 50 steps on 5 nuclei dropped AP@0.5 on
        similar images from 0.821 to 0.591."""
        from torch import nn

        model.train()
        if self.fine_tuning:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _validate(self, model, device) -> dict:
        from .metrics import match_objects, pixel_iou
        from .postprocess import decode_plane
        from .predict import predict_array

        model.eval()
        ious, scores = [], []
        output = engine_output(model.config)
        for plane in self.val_planes:
            maps = predict_array(
                model,
                plane.image,
                channel_axis=0,
                device=str(device),
                normalization=Normalization("none"),
                output=output,
            )
            labels = decode_plane(maps, mode=model.config.output_mode)
            ious.append(pixel_iou(labels * (plane.weights > 0), plane.truth))
            scores.append(match_objects(_scored_objects(labels, plane), plane.truth))
        self._train_mode(model)
        tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
        return {
            "iou": float(np.mean(ious)),
            "ap50": tp / max(tp + fp + fn, 1),
            "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        }

    def _save(self, model, iteration, best):
        from .modelfile import save_model

        previous = dict(self.model.metadata)
        metadata = {
            "trained_iterations": iteration + int(previous.get("trained_iterations", 0)),
            "validation": best,
            "loss": {
                "w0": self.config.w0,
                "sigma": self.config.sigma,
                "weights": self.config.weights,
            },
            "training_planes": len(self.train_planes),
            "diameter": self.diameter,
            "diameter_range": self.diameter_range,
            "validation_planes": len(self.val_planes),
            # samples never trained on (none when a lone image validates on itself)
            "validation_samples": sorted(
                {int(p.source[0]) for p in self.val_planes}
                - {int(p.source[0]) for p in self.train_planes}
            ),
        }
        if "postprocess" in previous:  # a fine-tuned model starts from its parent's recommendation
            metadata["postprocess"] = previous["postprocess"]
        save_model(model, self.output, normalization=self.config.normalization, metadata=metadata)

    def _checkpoint(self, model, optimizer, iteration, best):
        import os

        import torch

        state = {
            "config": model.config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "best": best,
            "metadata": dict(self.model.metadata),
            "normalization": self.config.normalization.to_dict(),
            "fine_tuning": self.fine_tuning,
            "baseline": self.baseline,
            "start_weights": self.start_weights,
        }
        target = checkpoint_path(self.output)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            try:
                torch.save(state, tmp)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            except (
                OSError,
                RuntimeError,
            ) as error:  # torch reports a full disk as "unexpected pos"
                raise OSError(
                    f"checkpoint: could not write {target} ({error}); the model file "
                    f"{self.output} keeps the best model so far"
                ) from None
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def rebuilds_outputs(init, mode: str | None) -> bool:
    """Whether fine-tuning the model file ``init`` into ``mode`` rebuilds its output layer
    (:func:`~.model.with_output_mode`); reads the file's header only."""
    from .modelfile import read_header

    if init is None or mode is None:
        return False
    return UNetConfig.from_dict(read_header(init)["config"]).output_mode != mode


def rebuilt_start_name(init, mode: str | None, remedy: str) -> str | None:
    """How a warning names the start of a fine-tuning run from the model file ``init`` whose
    output layer was rebuilt for ``mode``; None when it was not. A new distance output starts
    at zero and finds no seed until trained: ``remedy`` says, in the caller's terms, how to
    train it more."""
    if not rebuilds_outputs(init, mode):
        return None
    hint = f"; they find nothing until trained: {remedy}" if mode == "distance" else ""
    return f"its start ({init} with new {mode} outputs{hint})"


def resumes_fine_tuning(output) -> bool:
    """Whether the checkpoint beside ``output`` is of a fine-tuning run (False when there is
    none: :func:`train` then reports that)."""
    state = _checkpoint_state(output)
    return bool(state and state.get("fine_tuning"))


def checkpoint_config(output) -> UNetConfig | None:
    """The network of the checkpoint beside ``output``; None when there is no readable one
    (:func:`train` then reports that)."""
    state = _checkpoint_state(output)
    try:
        return UNetConfig.from_dict(state["config"]) if state else None
    except (KeyError, TypeError, ValueError):
        return None


def _checkpoint_state(output) -> dict | None:
    import torch

    path = checkpoint_path(output)
    if not path.is_file():
        return None
    try:  # weights_only: never runs code; the weights are checked when train() reads them
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def _read_checkpoint(output: Path) -> dict:
    import torch

    from .modelfile import check_weights_match

    path = checkpoint_path(output)
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint {path} beside the output; start without resume")
    try:
        # weights_only: tensors, numbers, strings and containers only; never runs code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = UNetConfig.from_dict(state["config"])
        check_weights_match(config, {k: tuple(v.shape) for k, v in state["model"].items()}, path)
        model = UNet(config)
        model.load_state_dict(state["model"])
    except Exception as error:
        raise ValueError(
            f"resume: {path} is not a readable training checkpoint ({error})"
        ) from None
    model.metadata = state["metadata"]
    if "normalization" in state:  # checkpoints before the model record lack it
        model.normalization = Normalization.from_dict(state["normalization"])
    return dict(state, model=model)


def _check_resumable_pull(resumed: dict | None, config: TrainConfig, output: Path) -> None:
    """A fine-tuning checkpoint written before runs kept their starting weights cannot resume
    the pull toward them; going on without it would silently be another recipe."""
    if (
        resumed
        and resumed.get("fine_tuning")
        and config.anchor
        and not resumed.get("start_weights")
    ):
        raise ValueError(
            f"anchor: the checkpoint {checkpoint_path(output)} holds no starting weights to pull "
            f"toward (written before fine-tuning kept them); resume with anchor 0 (--anchor 0), "
            f"or fine-tune again from the starting model"
        )


@dataclass
class _Start:
    """What a run starts from: a new network of ``model_config``, or the model file ``init``
    (with its output layer rebuilt for ``mode`` when that differs)."""

    model_config: UNetConfig | None
    init: Any
    mode: str | None

    @cached_property
    def new_head(self) -> bool:
        return rebuilds_outputs(self.init, self.mode)

    def model(self) -> UNet:
        if self.init is None:
            return UNet(self.model_config or UNetConfig(depth=3, base_channels=16))
        from .modelfile import load_model

        model = load_model(self.init)  # raises FileNotFoundError / ValueError naming "model"
        return (
            model if self.mode is None or not self.new_head else with_output_mode(model, self.mode)
        )

    def anchored(self, model: UNet) -> dict:
        """The weights of ``model`` (as it starts) that fine-tuning pulls toward: all but the
        output layer's when it was rebuilt for another mode, so its new outputs learn freely."""
        parameters = dict(model.named_parameters())
        if self.new_head:
            parameters = {k: v for k, v in parameters.items() if not k.startswith("head.")}
        return {k: v.detach().clone() for k, v in parameters.items()}


def _check_config(config: TrainConfig):
    positive = {
        "iterations": config.iterations,
        "batch": config.batch,
        "validate_every": config.validate_every,
    }
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"lr: expected a positive number, got {config.lr!r}")
    if not (math.isfinite(config.anchor) and config.anchor >= 0):
        raise ValueError(f"anchor: expected a non-negative number, got {config.anchor!r}")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {config.optimizer!r}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {config.lr_schedule!r}")
    if config.val_split not in VAL_SPLITS:
        raise ValueError(f"val_split: expected one of {VAL_SPLITS}, got {config.val_split!r}")
    if not 0 <= config.val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in [0, 1), got {config.val_fraction!r}")


def _check_patch(model: UNet, patch):
    smallest = model.legal_input_size(1)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < smallest:
        raise ValueError(
            f"patch: expected an input size of at least {smallest} px for this model "
            f"(margin {model.margin}), got {patch!r}"
        )
    if model.output_size(patch) is None:
        legal = model.legal_input_size(patch - model.margin)
        raise ValueError(f"patch: {patch} px is not a legal input size for this model; try {legal}")


def annotated_planes(samples: Sequence[Sample], config: TrainConfig, model: UNet) -> list:
    """The planes training uses: those with an annotation (a label, or a region), prepared
    (normalised image, target with gaps, weight map, foreground coordinates).

    Returns
    -------
    list of TrainingPlane
    """
    mode = model.config.output_mode
    planes = []
    for index, sample in enumerate(samples):
        image, labels, region = _checked_sample(sample, index, model)
        for lead in np.ndindex(*labels.shape[:-2]):
            plane = _prepared_plane(
                image[lead], labels[lead], None if region is None else region[lead], config, mode
            )
            if plane is not None:
                plane.source = (index, lead)
                planes.append(plane)
    return planes


def _checked_sample(sample: Sample, index: int, model: UNet):
    image = np.asarray(sample.image)
    labels = np.asarray(sample.labels)
    where = f"sample {index}"
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels ({where}): expected integer instance ids, got dtype {labels.dtype}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels ({where}): expected non-negative ids, got minimum {labels.min()}")
    if sample.channel_axis is None:
        image = image[..., None, :, :]
    else:
        image = np.moveaxis(image, sample.channel_axis, -3)
    if image.shape[:-3] + image.shape[-2:] != labels.shape or labels.ndim < 2:
        raise ValueError(
            f"labels ({where}): expected the image's shape without channels "
            f"{image.shape[:-3] + image.shape[-2:]}, got {labels.shape}"
        )
    if image.shape[-3] != model.config.in_channels:
        raise ValueError(
            f"image ({where}): the model expects {model.config.in_channels} "
            f"channel(s), got {image.shape[-3]}"
        )
    if image.size == 0 or not np.isfinite(image).all():
        raise ValueError(f"image ({where}): expected a non-empty image of finite values")
    region = None if sample.region is None else np.asarray(sample.region).astype(bool)
    if region is not None and region.shape != labels.shape:
        raise ValueError(f"region ({where}): expected shape {labels.shape}, got {region.shape}")
    return image, labels, region


def _prepared_plane(image, labels, region, config: TrainConfig, mode: str):
    from skimage.segmentation import relabel_sequential

    ignored = (
        np.zeros(labels.shape, bool)
        if config.ignore_label is None
        else labels == config.ignore_label
    )
    # 1..N: sparse ids near 2**32 would otherwise size per-id tables by the largest id
    ids = relabel_sequential(np.where(ignored, 0, labels).astype(np.int64))[0]
    valid = ~ignored if region is None else (region & ~ignored)
    if not valid.any() or (region is None and not ids.any()):
        return None
    separated = separate_touching(ids)
    weights = (
        border_weight_map(
            separated,
            _resolved(config.w0),
            _resolved(config.sigma),
            variant=config.weights,
            pixel_size=config.pixel_size,
            class_balance=config.class_balance,
            annotated=valid,
        )
        * valid
    )
    offset, scale = config.normalization.plane_stats(image)
    return TrainingPlane(
        source=(),
        image=((image.astype(np.float32) - offset) * scale).astype(np.float32),
        # Boundary mode derives its classes from the ungapped ids after augmentation; the
        # paper and distance modes learn the gapped ones.
        ids=(ids if mode == "boundary" else separated).astype(np.int64),
        weights=weights.astype(np.float32),
        truth=np.where(valid, ids, 0),
        foreground=np.argwhere((separated > 0) & valid),
    )


def _group(planes):
    groups: dict[int, list] = {}
    for plane in planes:
        groups.setdefault(plane.source[0], []).append(plane)
    return groups


def _object_count(planes) -> int:
    return sum(len(np.unique(p.truth[p.truth > 0])) for p in planes)


def _split(groups: dict, config: TrainConfig):
    """Hold out whole samples ("image") or planes ("plane"; "auto": images when there are
    several). A single plane is split in two along Y (:func:`_split_plane`), or else some of its
    objects are held out (:func:`_split_objects`); when even that leaves nothing to hold out,
    validation scores the training planes (the same list object), better than no model
    selection at all."""
    rng = np.random.default_rng(config.seed)
    by_image = config.val_split == "image" or (config.val_split == "auto" and len(groups) > 1)
    if by_image:
        units = list(groups.values())
    else:
        units = [[p] for planes in groups.values() for p in planes]
    flat = [p for unit in units for p in unit]
    if len(flat) == 1 and config.val_fraction > 0:
        parts = _split_plane(flat[0], config.val_fraction) or _split_objects(
            flat[0], config.val_fraction, rng
        )
        if parts is not None:
            return [parts[0]], [parts[1]]
    if len(units) < 2 or config.val_fraction == 0:
        return flat, flat
    held = max(1, round(config.val_fraction * len(units)))
    order = rng.permutation(len(units))
    val = [p for i in order[:held] for p in units[i]]
    train = [p for i in order[held:] for p in units[i]]
    return train, val


_MIN_PART_ROWS = 32


def _split_plane(plane: TrainingPlane, fraction: float):
    """(top, bottom) parts of one plane, the bottom holding about ``fraction`` of the annotated
    object pixels, cut between objects where possible; None when a part would be under 32 rows
    or hold no object."""
    rows = np.nonzero(plane.truth)[0]
    if rows.size == 0:
        return None
    height = plane.truth.shape[0]
    cut = _cut_between_objects(plane.truth, int(np.quantile(rows, 1.0 - fraction)))
    if cut < _MIN_PART_ROWS or height - cut < _MIN_PART_ROWS:
        return None
    parts = []
    for window, shift in ((slice(0, cut), 0), (slice(cut, height), cut)):
        inside = (plane.foreground[:, 0] >= window.start) & (plane.foreground[:, 0] < window.stop)
        parts.append(
            TrainingPlane(
                source=plane.source,
                image=plane.image[:, window],
                ids=plane.ids[window],
                weights=plane.weights[window],
                truth=plane.truth[window],
                foreground=plane.foreground[inside] - np.array([shift, 0]),
            )
        )
    if not parts[0].truth.any() or not parts[1].truth.any():
        return None
    return tuple(parts)


_HOLD_OUT_MARGIN = 4


def _split_objects(plane: TrainingPlane, fraction: float, rng):
    """(training, validation) views of one plane that hold out about ``fraction`` of its objects
    (at least one, leaving two to train on), chosen at random among those the annotation holds
    whole; None under three objects.

    Validation sees only the held-out objects and the background within 4 px of them; training
    ignores exactly those pixels. A few painted nuclei in one region rarely leave a row to cut
    between (:func:`_split_plane`), and scoring the training objects themselves let fine-tuning
    replace its start with a model that had learnt them and lost on the rest of the image
    (bench_finetune.py: 0.636 -> 0.500 AP@0.5 with 18 painted nuclei).
    """
    from scipy import ndimage

    ids = np.unique(plane.truth[plane.truth > 0])
    if ids.size < 3:
        return None
    count = min(max(1, round(fraction * ids.size)), ids.size - 2)
    annotated = plane.weights > 0
    cut = np.unique(plane.truth[ndimage.binary_dilation(~annotated) & (plane.truth > 0)])
    whole = np.setdiff1d(ids, cut)
    held = rng.choice(whole if whole.size >= count else ids, count, replace=False)
    near = ndimage.binary_dilation(np.isin(plane.truth, held), iterations=_HOLD_OUT_MARGIN)
    zone = near & annotated & ~np.isin(plane.truth, np.setdiff1d(ids, held))
    in_zone = zone[tuple(plane.foreground.T)]
    return _part(plane, ~zone, ~in_zone), _part(plane, zone, in_zone, annotated)


def _part(plane: TrainingPlane, inside, keep, annotated=None) -> TrainingPlane:
    """``plane`` limited to the pixels ``inside`` (foreground coordinates ``keep``)."""
    return replace(
        plane,
        weights=np.where(inside, plane.weights, 0).astype(np.float32),
        truth=np.where(inside, plane.truth, 0),
        foreground=plane.foreground[keep],
        annotated=annotated,
    )


def _scored_objects(labels: np.ndarray, plane: TrainingPlane) -> np.ndarray:
    """The predicted objects validation scores on ``plane``: those inside its region; on a
    plane of held-out objects (:func:`_split_objects`), each object that covers held-out
    pixels or lies mostly in their surroundings, whole over the annotated area. Cut at the
    surroundings' edge, a held-out nucleus merged with a training neighbour would look found.

    Parameters
    ----------
    labels : numpy.ndarray, shape (Y, X)
        Predicted instance ids of the whole plane.
    plane : TrainingPlane

    Returns
    -------
    numpy.ndarray, shape (Y, X)
    """
    region = plane.weights > 0
    if plane.annotated is None:
        return labels * region
    scored = np.where(plane.annotated, labels, 0)
    count = int(scored.max()) + 1
    total = np.bincount(scored.ravel(), minlength=count)
    inside = np.bincount(scored[region], minlength=count)
    on_held = np.bincount(scored[plane.truth > 0], minlength=count)
    keep = (on_held > 0) | (2 * inside > total)
    keep[0] = False
    return np.where(keep[scored], scored, 0)


def _cut_between_objects(truth: np.ndarray, target: int) -> int:
    """The row nearest ``target`` above which no object continues (objects stay whole in one
    part), leaving both parts at least 32 rows; ``target`` itself when there is none."""
    crossing = ((truth[:-1] == truth[1:]) & (truth[1:] > 0)).any(axis=1)  # cut at r+1 splits
    free = np.flatnonzero(~crossing) + 1
    free = free[(free >= _MIN_PART_ROWS) & (free <= truth.shape[0] - _MIN_PART_ROWS)]
    return int(free[np.argmin(np.abs(free - target))]) if free.size else target


def _batch(planes, config: TrainConfig, rng):
    """A batch of patches (images, ids, weights), each cut at a random zoom."""
    patches = [_patch(planes[rng.integers(len(planes))], config, rng) for _ in range(config.batch)]
    images, ids, weights = zip(*patches)
    return np.stack(images), np.stack(ids), np.stack(weights).astype(np.float32)


def _patch(plane: TrainingPlane, config: TrainConfig, rng):
    size = config.patch
    low, high = config.augmentation.zoom
    zoom = math.exp(rng.uniform(math.log(low), math.log(high))) if high > low else low
    window = max(2, round(size / zoom))
    cy, cx = _patch_centre(plane, rng, config.foreground_bias)
    rows, row_inside = _window(cy - window // 2, window, plane.ids.shape[0])
    cols, col_inside = _window(cx - window // 2, window, plane.ids.shape[1])
    image = plane.image[:, rows[:, None], cols[None, :]]
    ids = plane.ids[rows[:, None], cols[None, :]]
    # Mirrored context is input only: no loss on pixels outside the image.
    weights = plane.weights[rows[:, None], cols[None, :]] * (
        row_inside[:, None] & col_inside[None, :]
    )
    if window != size:
        image, ids, weights = _resized(image, ids, weights, size)
    return image, ids, weights


def _resized(image, ids, weights, size: int):
    """Resample a (C, w, w) window and its (w, w) ids and weights to ``size`` pixels a side:
    the image linearly, ids and weights by nearest neighbour (ids stay ids)."""
    from scipy import ndimage

    factor = size / image.shape[-1]
    image = np.stack(
        [
            ndimage.zoom(channel, factor, order=1, grid_mode=True, mode="grid-mirror")
            for channel in image
        ]
    )
    nearest = {"order": 0, "grid_mode": True, "mode": "grid-mirror"}
    ids = ndimage.zoom(ids, factor, **nearest)
    weights = ndimage.zoom(weights, factor, **nearest)
    return image[:, :size, :size], ids[:size, :size], weights[:size, :size]


def _patch_centre(plane: TrainingPlane, rng, foreground_bias: float):
    # Foreground-centred patches outnumber random ones foreground_bias : 1 (Fiji plugin: 1 : 0.1).
    if len(plane.foreground) and rng.random() < foreground_bias / (foreground_bias + 1):
        return plane.foreground[rng.integers(len(plane.foreground))]
    return rng.integers(plane.ids.shape[0]), rng.integers(plane.ids.shape[1])


def _window(start, size, length):
    index = np.arange(start, start + size)
    return mirror_indices(start, size, length), (index >= 0) & (index < length)


def _optimizer(model, config: TrainConfig):
    import torch

    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.99)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def _set_learning_rate(optimizer, config: TrainConfig, iteration: int):
    # A pure function of the iteration, so a resumed run continues the same schedule.
    factor = 1.0
    if config.lr_schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * (iteration - 1) / max(config.iterations, 1)))
    for group in optimizer.param_groups:
        group["lr"] = config.lr * factor


def _resolved(value: float | None) -> float:
    """A loss-weight setting that ``_check_config`` has filled in from the variant table."""
    if value is None:
        raise ValueError("w0, sigma: expected values filled in from the weight variant")
    return value


# The IoU gain that counts shrinks as the standard error of a mean over the validation objects
# does. Set on bench_finetune.py runs (RESULTS.md): gains that helped elsewhere, 0.024 on 2
# objects and 0.014 on 5; gains that hurt, 0.010 on 2, 0.001 on 6, 0.022 and 0.062 on 1.
IOU_GAIN_AT_ONE_OBJECT = 0.03


def min_iou_gain(objects: int) -> float:
    """The pixel-IoU gain over the starting model that replaces it when AP@0.5 ties:
    ``0.03 / sqrt(objects)`` for ``objects`` validation objects; infinite under 2 (one held-out
    object's IoU alone never replaces it)."""
    return IOU_GAIN_AT_ONE_OBJECT / math.sqrt(objects) if objects >= 2 else math.inf


def beats_start(objects: int) -> str:
    """What a fine-tuned model must show to replace its start, in words, for ``objects``
    validation objects (quoted by the CLI and the Train widget when the start is kept)."""
    gain = min_iou_gain(objects)
    if math.isinf(gain):
        return (
            "a higher AP@0.5 and a pixel IoU not lower (on fewer than 2 validation objects, "
            "IoU alone does not count)"
        )
    return (
        f"a higher AP@0.5, or pixel IoU up by {gain:.3f} ({IOU_GAIN_AT_ONE_OBJECT:g} / sqrt of "
        f"its {objects} validation objects), and lower on neither"
    )


def _improves(
    metrics: dict, best: dict | None, start: dict | None = None, min_gain: float = math.inf
) -> bool:
    """A validation worth saving: the first, or one at least as good as the best so far (AP@0.5,
    ties broken by pixel IoU).

    When fine-tuning, it must also beat the model the run started from (``start``, scored at
    iteration 0): a higher AP@0.5, or pixel IoU up by ``min_gain`` (:func:`min_iou_gain`), and
    lower on neither. A few painted nuclei are often the only validation data. Measured with
    bench_finetune.py: a model that traded IoU for one more matched object there (AP 0.125 ->
    0.167, IoU 0.825 -> 0.806) lowered AP@0.5 on similar images from 0.826 to 0.750; one with
    IoU up by 0.001 on 6 held-out nuclei lowered it from 0.898 to 0.892, one with IoU up by
    0.022 on 1 lowered the rest of its image from 0.788 to 0.763.
    """
    ap50, iou = metrics["ap50"], metrics["iou"]
    if start is not None:
        if ap50 < start["ap50"] or iou < start["iou"]:
            return False
        if ap50 == start["ap50"] and not iou >= start["iou"] + min_gain:
            return False
    return best is None or (ap50, iou) >= (best["ap50"], best["iou"])
