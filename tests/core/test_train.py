from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from napari_tiled_unet.core.augment import Augmentation
from napari_tiled_unet.core.metrics import pixel_iou, split_touching_pairs
from napari_tiled_unet.core.model import UNetConfig
from napari_tiled_unet.core.modelfile import load_model, save_model
from napari_tiled_unet.core.normalize import Normalization
from napari_tiled_unet.core.postprocess import label_plane
from napari_tiled_unet.core.predict import predict_array
from napari_tiled_unet.core.train import Sample, TrainConfig, annotated_planes, train

from ..conftest import make_model
from ..synthetic import touching_blobs

TINY = UNetConfig(depth=2, base_channels=8)
SAME_SCALE = Augmentation(zoom=(1.0, 1.0))


def scratch_session(samples, config):
    """A run from scratch (TINY), prepared but not started."""
    from napari_tiled_unet.core.train import _Session, _Start

    return _Session.prepared(
        samples, Path("m.safetensors"), config, _Start(TINY, None, None), False, bool
    )


def quick(**changes):
    settings = {
        "iterations": 600,
        "batch": 4,
        "patch": 92,
        "lr": 1e-3,
        "lr_schedule": "constant",  # these tests' own settings, not the product's defaults
        "sigma": 3.0,
        "validate_every": 150,
        "device": "cpu",
    }
    settings.update(changes)
    return TrainConfig(**settings)


def test_tiny_net_learns_to_segment_and_separate_touching_blobs(tmp_path):
    samples = [Sample(*touching_blobs(seed)) for seed in range(8)]
    # Seeds 0-3 measured: held-out IoU 0.844 / 0.902 / 0.903 / 0.898, every touching pair split
    # (without scale augmentation: these blobs all have one size).
    events = list(
        train(
            samples,
            tmp_path / "m.safetensors",
            config=quick(seed=1, augmentation=SAME_SCALE),
            model_config=TINY,
        )
    )
    assert [e.iteration for e in events] == list(range(1, 601))
    assert [e.metrics["iteration"] for e in events if e.metrics] == [150, 300, 450, 600]
    assert events[-1].loss < events[0].loss / 2
    model = load_model(tmp_path / "m.safetensors")
    assert model.metadata["validation"] == events[-1].best
    ious, separated, touching = [], 0, 0
    for seed in range(100, 104):  # held out: never seen in training
        image, truth = touching_blobs(seed)
        predicted = label_plane(predict_array(model, image))
        ious.append(pixel_iou(predicted, truth))
        done, total = split_touching_pairs(predicted, truth)
        separated, touching = separated + done, touching + total
    assert np.mean(ious) >= 0.85
    assert touching >= 20 and separated / touching >= 0.8


def test_only_annotated_planes_of_a_sparse_stack_are_used():
    stack = np.random.default_rng(0).random((10, 64, 64), dtype=np.float32)
    labels = np.zeros(stack.shape, np.int32)
    labels[3, 10:20, 10:20] = 1
    labels[7, 30:40, 30:50] = 5
    planes = annotated_planes([Sample(stack, labels)], quick(), make_model(depth=2))
    assert [p.source for p in planes] == [(0, (3,)), (0, (7,))]
    assert planes[1].foreground[:, 0].min() == 30 and len(planes[1].foreground) == 200


def test_region_limits_background_and_ignore_label_is_ignored():
    image = np.random.default_rng(1).random((40, 40), dtype=np.float32)
    labels = np.zeros((40, 40), np.int32)
    labels[5:10, 5:10] = 1
    labels[20:25, 20:25] = 9  # "not sure" label
    region = np.zeros((40, 40), bool)
    region[:30, :30] = True
    config = quick(ignore_label=9)
    (plane,) = annotated_planes([Sample(image, labels, region)], config, make_model(depth=2))
    assert (plane.weights[~region] == 0).all()
    assert (plane.weights[20:25, 20:25] == 0).all() and plane.ids[20:25, 20:25].sum() == 0
    assert (plane.weights[region & (labels == 0)] > 0).all()
    assert set(np.unique(plane.truth)) == {0, 1}
    # classes balanced over the 900 - 25 annotated pixels: 25 foreground
    assert plane.weights[7, 7] == pytest.approx(875 / (2 * 25))


def test_stopping_leaves_a_loadable_model_and_fine_tuning_continues_it(tmp_path):
    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    polls = []

    def stop_after_three():
        polls.append(1)
        return len(polls) > 3

    events = list(
        train(
            samples,
            tmp_path / "a.safetensors",
            config=quick(),
            model_config=TINY,
            should_stop=stop_after_three,
        )
    )
    assert events[-1].stopped and events[-1].iteration == 3
    first = load_model(tmp_path / "a.safetensors")
    assert first.metadata["trained_iterations"] == 3
    own_scaling = Normalization("percentile", 2.0, 98.0)
    save_model(
        first,
        tmp_path / "a.safetensors",
        normalization=own_scaling,
        metadata={**first.metadata, "postprocess": {"threshold": 0.7, "min_size": 9}},
    )
    tuned = list(
        train(
            samples,
            tmp_path / "b.safetensors",
            config=quick(iterations=300, validate_every=150),
            init=tmp_path / "a.safetensors",
        )
    )
    assert not tuned[-1].kept_start  # 3 iterations left much to learn
    second = load_model(tmp_path / "b.safetensors")
    assert second.config == first.config and second.normalization == own_scaling
    assert second.metadata["trained_iterations"] == 3 + tuned[-1].best["iteration"]
    assert second.metadata["postprocess"] == {"threshold": 0.7, "min_size": 9}


def bad_training(tmp_path, sample=None, **changes):
    image, labels = touching_blobs(0, size=64, pairs=1, singles=1)
    sample = sample or Sample(image, labels)
    init = changes.pop("init", None)
    return lambda: train(
        [sample], tmp_path / "m.safetensors", config=quick(**changes), model_config=TINY, init=init
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("shape", "labels \\(sample 0\\): expected the image's shape"),
        ("empty", "no annotated plane"),
        ("float", "labels \\(sample 0\\): expected integer"),
        ("negative", "labels \\(sample 0\\): expected non-negative"),
        ("patch", "patch: expected an input size of at least 44 px"),
        ("illegal patch", "patch: 90 px is not a legal input size for this model; try 92"),
        ("init", "model: no such file"),
        ("anchor", "anchor: expected a non-negative number, got -1.0"),
    ],
)
def test_bad_training_input_is_rejected_before_work(case, match, tmp_path):
    image, labels = touching_blobs(0, size=64, pairs=1, singles=1)
    call = {
        "shape": bad_training(tmp_path, Sample(image, labels[:-1])),
        "empty": bad_training(tmp_path, Sample(image, np.zeros_like(labels))),
        "float": bad_training(tmp_path, Sample(image, labels.astype(np.float32))),
        "negative": bad_training(tmp_path, Sample(image, labels - 1)),
        "patch": bad_training(tmp_path, patch=40),
        "illegal patch": bad_training(tmp_path, patch=90),
        "init": bad_training(tmp_path, init=tmp_path / "missing.safetensors"),
        "anchor": bad_training(tmp_path, anchor=-1.0),
    }[case]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        call()
    assert not (tmp_path / "m.safetensors").exists()


def test_resume_continues_a_stopped_run_from_its_checkpoint(tmp_path):
    from napari_tiled_unet.core.train import checkpoint_path

    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    output = tmp_path / "m.safetensors"
    polls = []
    config = quick(iterations=9, validate_every=4)
    stopped = list(
        train(
            samples,
            output,
            config=config,
            model_config=TINY,
            should_stop=lambda: polls.append(1) or len(polls) > 5,
        )
    )
    assert stopped[-1].stopped and stopped[-1].iteration == 5
    assert checkpoint_path(output).is_file()
    resumed = list(train(samples, output, config=config, resume=True))
    assert [e.iteration for e in resumed] == [6, 7, 8, 9]
    assert resumed[0].best == stopped[-1].best  # the best so far is carried over
    assert load_model(output).metadata["trained_iterations"] == resumed[-1].best["iteration"]
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        train(samples, tmp_path / "other.safetensors", config=config, resume=True)


def test_validation_holds_out_whole_images_or_planes():

    stack = np.stack([touching_blobs(seed, size=64, pairs=1, singles=1)[0] for seed in range(4)])
    labels = np.stack([touching_blobs(seed, size=64, pairs=1, singles=1)[1] for seed in range(4)])
    samples = [Sample(stack, labels), Sample(stack[:2], labels[:2])]

    def split(**changes):
        session = scratch_session(samples, quick(**changes))
        return ({p.source for p in session.train_planes}, {p.source for p in session.val_planes})

    train_set, val_set = split(val_fraction=0.4, val_split="image")
    assert {s for s, _ in val_set} in ({0}, {1}) and not {s for s, _ in train_set} & {
        s for s, _ in val_set
    }
    train_set, val_set = split(val_fraction=0.5, val_split="plane")
    assert len(val_set) == 3 and len(train_set) == 3 and not train_set & val_set


def test_a_seed_repeats_a_run_exactly_and_validation_changes_nothing(tmp_path):
    samples = [Sample(*touching_blobs(seed, size=96)) for seed in range(2)]
    runs = []
    for index, every in enumerate((5, 1000)):
        config = quick(iterations=12, batch=2, validate_every=every, seed=3)
        runs.append(
            [
                e.loss
                for e in train(
                    samples, tmp_path / f"{index}.safetensors", config=config, model_config=TINY
                )
            ]
        )
    assert np.allclose(runs[0], runs[1], rtol=0, atol=1e-5)


def test_cosine_schedule_decays_to_zero_and_metadata_names_the_held_out_samples(tmp_path):
    import torch

    from napari_tiled_unet.core.train import _set_learning_rate

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    config = quick(iterations=5, lr=0.1, lr_schedule="cosine")
    rates = []
    for iteration in range(1, 6):
        _set_learning_rate(optimizer, config, iteration)
        rates.append(optimizer.param_groups[0]["lr"])
    expected = [0.1 * 0.5 * (1 + np.cos(np.pi * i / 5)) for i in range(5)]
    assert np.allclose(rates, expected, rtol=0, atol=1e-12) and rates[0] == 0.1
    _set_learning_rate(optimizer, quick(lr=0.1), 4)
    assert optimizer.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="lr_schedule: expected one of"):
        train(
            [Sample(*touching_blobs(0))],
            tmp_path / "x.safetensors",
            config=quick(lr_schedule="step"),
        )

    samples = [Sample(*touching_blobs(seed, size=64, pairs=1, singles=1)) for seed in range(5)]
    output = tmp_path / "m.safetensors"
    list(
        train(
            samples,
            output,
            config=quick(iterations=2, val_fraction=0.4, lr_schedule="cosine"),
            model_config=TINY,
        )
    )
    held = load_model(output).metadata["validation_samples"]
    assert len(held) == 2 and set(held) <= set(range(5))


@pytest.mark.parametrize("mode", ["boundary", "distance"])
def test_each_separating_mode_learns_to_split_touching_blobs(tmp_path, mode):
    from napari_tiled_unet.core.postprocess import decode_plane

    samples = [Sample(*touching_blobs(seed)) for seed in range(8)]
    config = quick(seed=1, augmentation=SAME_SCALE)
    architecture = UNetConfig(depth=2, base_channels=8, n_classes=3, mode=mode)
    events = list(
        train(samples, tmp_path / "m.safetensors", config=config, model_config=architecture)
    )
    model = load_model(tmp_path / "m.safetensors")
    assert model.config.output_mode == mode and events[-1].best["ap50"] > 0.5
    ious, separated, touching = [], 0, 0
    for seed in range(100, 104):
        image, truth = touching_blobs(seed)
        maps = predict_array(model, image, output="classes")
        assert maps.shape == (3, *image.shape) and maps.min() >= 0 and maps.max() <= 1
        predicted = decode_plane(maps, mode=mode)
        ious.append(pixel_iou(predicted, truth))
        done, total = split_touching_pairs(predicted, truth)
        separated, touching = separated + done, touching + total
    assert np.mean(ious) >= 0.8
    assert touching >= 20 and separated / touching >= 0.8


def test_zoomed_patches_scale_objects_and_the_model_records_their_diameter(tmp_path):
    from dataclasses import replace

    from napari_tiled_unet.core.train import _patch, median_diameter

    labels = np.zeros((200, 200), np.int32)
    labels[90:110, 90:110] = 1  # a 20 x 20 square in the middle
    image = (labels > 0).astype(np.float32)
    (plane,) = annotated_planes([Sample(image, labels)], quick(), make_model(depth=2))
    rng = np.random.default_rng(0)
    for zoom, area in ((2.0, 1600), (0.5, 100)):
        config = quick(
            patch=92, foreground_bias=1e9, augmentation=replace(Augmentation(), zoom=(zoom, zoom))
        )
        patch, ids, weights = _patch(plane, config, rng)
        assert patch.shape == (1, 92, 92) and ids.shape == weights.shape == (92, 92)
        assert abs(int((ids == 1).sum()) - area) <= 0.15 * area
        assert set(np.unique(ids)) <= {0, 1}  # ids stay ids
    assert median_diameter([labels]) == pytest.approx(np.sqrt(4 * 400 / np.pi))
    output = tmp_path / "m.safetensors"
    list(
        train(
            [Sample(image, labels)],
            output,
            config=quick(
                iterations=2, patch=92, augmentation=replace(Augmentation(), zoom=(0.5, 2.0))
            ),
            model_config=TINY,
        )
    )
    metadata = load_model(output).metadata
    assert metadata["diameter"] == pytest.approx(22.57, abs=0.01)
    # one 22.57 px object seen at zooms 0.5-2 (log-uniform): the 10th and 90th percentiles
    assert metadata["diameter_range"] == pytest.approx([12.99, 39.39], abs=0.01)


def test_sparse_ids_near_two_to_the_32_train_like_small_ones():
    image, labels = touching_blobs(3, size=64, pairs=2, singles=1)
    sparse = np.where(labels > 0, labels.astype(np.uint32) + np.uint32(3_000_000_000), 0).astype(
        np.uint32
    )
    (small,) = annotated_planes([Sample(image, labels)], quick(), make_model(depth=2))
    (large,) = annotated_planes([Sample(image, sparse)], quick(), make_model(depth=2))
    assert np.array_equal(small.ids, large.ids) and np.array_equal(small.weights, large.weights)


def test_one_annotated_plane_is_split_along_y_to_hold_out_objects():
    """One image: the bottom part (about val_fraction of the object pixels) validates; too small
    an annotation validates on itself and says so."""

    image, labels = touching_blobs(0, size=128)
    session = scratch_session([Sample(image, labels)], quick(val_fraction=0.25))
    (top,), (bottom,) = session.train_planes, session.val_planes
    assert top.ids.shape[0] + bottom.ids.shape[0] == 128 and top.ids.shape[1] == 128
    np.testing.assert_array_equal(
        np.concatenate([top.image, bottom.image], axis=1),
        annotated_planes([Sample(image, labels)], quick(), make_model(2, 8))[0].image,
    )
    assert 0.1 < (bottom.truth > 0).sum() / (labels > 0).sum() < 0.4
    for part in (top, bottom):  # foreground coordinates follow their part
        assert part.foreground[:, 0].max() < part.ids.shape[0]
        assert (part.ids[tuple(part.foreground.T)] > 0).all()
    data = session.data
    assert data.held_out and data.train_planes == data.val_planes == 1
    assert data.train_objects == len(np.unique(top.truth[top.truth > 0]))
    assert data.describe().startswith(
        f"training on {data.train_objects} objects in 1 plane(s), "
        f"validating on {data.val_objects} other objects"
    )

    small, small_labels = touching_blobs(0, size=48, pairs=1, singles=0)
    session = scratch_session([Sample(small, small_labels)], quick(patch=44))
    assert session.val_planes is session.train_planes and not session.data.held_out
    assert "validating on the same objects" in session.data.describe()


def test_objects_in_a_row_hold_out_one_object_and_its_surroundings():
    """Five nuclei side by side leave no row to cut between: one whole nucleus and the background
    within 4 px of it validate, and training ignores exactly those pixels."""
    from scipy import ndimage

    yy, xx = np.mgrid[:96, :128]
    labels = np.zeros((96, 128), np.int32)
    for index, cx in enumerate(range(14, 128, 25), start=1):
        labels[np.hypot(yy - 48, xx - cx) < 9] = index
    image = (labels > 0).astype(np.float32) + np.random.default_rng(0).normal(0, 0.05, labels.shape)
    session = scratch_session([Sample(image, labels)], quick())
    (fit,), (val,) = session.train_planes, session.val_planes
    (held,) = np.unique(val.truth[val.truth > 0])
    np.testing.assert_array_equal(val.truth, np.where(labels == held, held, 0))
    zone = ndimage.binary_dilation(labels == held, iterations=4) & ~(labels > 0) | (labels == held)
    np.testing.assert_array_equal(val.weights > 0, zone)
    np.testing.assert_array_equal(fit.weights > 0, ~zone)
    assert set(np.unique(fit.truth)) == set(range(6)) - {held}
    assert not zone[tuple(fit.foreground.T)].any() and zone[tuple(val.foreground.T)].all()
    assert len(fit.foreground) + len(val.foreground) == (fit.ids > 0).sum()
    data = session.data
    assert data.held_out and (data.train_objects, data.val_objects) == (4, 1)
    assert session.start_weights is None and session._pull_to_start(None) == 0  # from scratch


def test_a_held_out_nucleus_merged_with_a_training_neighbour_scores_as_missed():
    """Validation keeps a predicted object that reaches the held-out nucleus whole: cut at the
    edge of its surroundings, a merge with the neighbour would score as found."""
    from skimage.segmentation import expand_labels

    from napari_tiled_unet.core.metrics import match_objects
    from napari_tiled_unet.core.train import _scored_objects

    yy, xx = np.mgrid[:96, :128]
    labels = np.zeros((96, 128), np.int32)
    for index, cx in enumerate(range(14, 128, 25), start=1):
        labels[np.hypot(yy - 48, xx - cx) < 9] = index
    image = (labels > 0).astype(np.float32)
    session = scratch_session([Sample(image, labels)], quick())
    (val,) = session.val_planes
    (held,) = np.unique(val.truth[val.truth > 0])
    neighbour = held + 1 if held < 5 else held - 1
    grown = expand_labels(labels, 1)  # neighbours reach 1 px into the held-out surroundings
    found = match_objects(_scored_objects(grown, val), val.truth)
    assert (found.tp, found.fp, found.fn) == (1, 0, 0)  # and are not false objects there
    left, right = sorted(14 + 25 * (i - 1) for i in (held, neighbour))
    merged = np.where(labels == neighbour, held, labels)
    merged[44:53, left : right + 1] = held
    missed = match_objects(_scored_objects(merged, val), val.truth)
    assert (missed.tp, missed.fp, missed.fn) == (0, 1, 1)
    cut = match_objects(merged * (val.weights > 0), val.truth)
    assert cut.tp == 1  # what cutting at the surroundings scored
    spurious = labels.copy()
    spurious[46:50, 14 + 25 * (held - 1) + 10 : 14 + 25 * (held - 1) + 12] = 9
    extra = match_objects(_scored_objects(spurious, val), val.truth)
    assert (extra.tp, extra.fp, extra.fn) == (1, 1, 0)


def test_fine_tuning_scores_its_starting_model_first(tmp_path):
    from napari_tiled_unet.core.train import TrainEvent

    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    save_model(make_model(depth=2, base_channels=8), tmp_path / "start.safetensors")
    events = list(
        train(
            samples,
            tmp_path / "b.safetensors",
            init=tmp_path / "start.safetensors",
            config=quick(iterations=2, validate_every=2),
        )
    )
    baseline = events[0].baseline
    assert baseline["iteration"] == 0 and set(baseline) >= {"ap50", "iou", "f1"}
    assert all(e.baseline == baseline for e in events)
    scratch = list(
        train(
            samples,
            tmp_path / "c.safetensors",
            model_config=TINY,
            config=quick(iterations=2, validate_every=2),
        )
    )
    assert scratch[-1].baseline is None and not scratch[-1].kept_start

    def event(best_iteration):
        best = {"ap50": 0.5, "iou": 0.5, "iteration": best_iteration}
        return TrainEvent(5, 5, 0.1, None, best, 1.0, baseline={**best, "iteration": 0})

    assert event(0).kept_start and not event(4).kept_start


def test_fine_tuning_keeps_its_starting_model_until_a_fine_tuned_one_validates_better(tmp_path):
    """The guard against fine-tuning making things worse: the start is the output first, and
    only a validation with a higher AP@0.5, or IoU up by 0.03 / sqrt(validation objects) (never
    on one object alone), and lower on neither replaces it (a tie keeps the start, and so do a
    trade of one for the other and a noise-sized IoU gain)."""
    import math

    from napari_tiled_unet.core.train import _improves, beats_start, min_iou_gain

    assert min_iou_gain(2) == pytest.approx(0.03 / math.sqrt(2))
    assert min_iou_gain(9) == pytest.approx(0.01)
    assert min_iou_gain(1) == min_iou_gain(0) == math.inf
    assert "pixel IoU up by 0.010 (0.03 / sqrt of its 9 validation objects)" in beats_start(9)
    assert "IoU alone does not count" in beats_start(1)
    start = {"ap50": 0.5, "iou": 0.6, "iteration": 0}
    for ap50, iou, objects, replaces in [
        (0.5, 0.6, 9, False),  # a tie
        (0.4, 0.9, 9, False),
        (0.7, 0.59, 9, False),  # one more matched object for some IoU
        (0.5, 0.609, 9, False),  # IoU up by less than 0.03 / 3
        (0.5, 0.611, 9, True),
        (0.5, 0.611, 2, False),  # the same gain on 2 objects: under 0.021
        (0.5, 0.9, 1, False),  # one object's IoU alone
        (0.6, 0.6, 1, True),
        (0.6, 0.6, 9, True),
    ]:
        gain = min_iou_gain(objects)
        assert _improves({"ap50": ap50, "iou": iou}, start, start, gain) is replaces, (ap50, iou)
    # between fine-tuned models AP@0.5 decides and IoU breaks ties, above the start on both
    tuned = {"ap50": 0.6, "iou": 0.7, "iteration": 50}
    assert _improves({"ap50": 0.6, "iou": 0.7}, tuned, start)
    assert _improves({"ap50": 0.7, "iou": 0.65}, tuned, start)
    assert not _improves({"ap50": 0.8, "iou": 0.55}, tuned, start)
    assert not _improves({"ap50": 0.59, "iou": 0.9}, tuned, start)
    assert _improves({"ap50": 0.8, "iou": 0.55}, tuned)  # from scratch: no start to beat
    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    good = tmp_path / "good.safetensors"
    list(train(samples, good, model_config=TINY, config=quick(iterations=300)))
    # lr 1: any step wrecks the weights, so every validation is worse than the start
    events = list(
        train(
            samples,
            tmp_path / "f.safetensors",
            init=good,
            config=quick(iterations=4, validate_every=2, lr=1.0),
        )
    )
    import torch

    assert events[-1].kept_start and events[-1].best == events[-1].baseline
    kept, started = load_model(tmp_path / "f.safetensors"), load_model(good)
    for name, tensor in started.state_dict().items():
        assert torch.equal(kept.state_dict()[name], tensor), name


def test_the_fiji_variant_brings_its_own_w0_and_sigma_from_python_too():
    from napari_tiled_unet.core.weights import VARIANT_DEFAULTS

    assert (TrainConfig().w0, TrainConfig().sigma) == VARIANT_DEFAULTS["paper"] == (10.0, 5.0)
    fiji = TrainConfig(weights="fiji")
    assert (fiji.w0, fiji.sigma) == VARIANT_DEFAULTS["fiji"] == (50.0, 6.0)
    assert (TrainConfig(weights="fiji", w0=7.0).w0, TrainConfig(weights="fiji", w0=7.0).sigma) == (
        7.0,
        6.0,
    )


def test_resume_keeps_the_normalisation_of_the_stopped_run(tmp_path):
    """The checkpoint records how inputs were scaled; a resumed run (whose own config says
    otherwise) goes on with it and writes it into the model."""
    from dataclasses import replace

    from napari_tiled_unet.core.normalize import Normalization

    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    output = tmp_path / "m.safetensors"
    polls = []
    first = replace(
        quick(iterations=9, validate_every=4), normalization=Normalization("percentile", 2.0, 98.0)
    )
    list(
        train(
            samples,
            output,
            config=first,
            model_config=TINY,
            should_stop=lambda: polls.append(1) or len(polls) > 5,
        )
    )
    list(train(samples, output, config=quick(iterations=9, validate_every=4), resume=True))
    assert load_model(output).normalization == Normalization("percentile", 2.0, 98.0)


def test_fine_tuning_keeps_the_batch_norm_statistics_of_its_start(tmp_path, monkeypatch):
    """A few annotated nuclei must not replace the statistics the model was trained with."""
    import torch

    from napari_tiled_unet.core import train as train_module

    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    start = make_model(depth=2, base_channels=4, norm="batch", seed=5)  # mean 0, var 1
    save_model(start, tmp_path / "start.safetensors")
    monkeypatch.setattr(train_module, "_improves", lambda *args: True)  # keep the last
    list(
        train(
            samples,
            tmp_path / "tuned.safetensors",
            init=tmp_path / "start.safetensors",
            config=quick(iterations=3, validate_every=3),
        )
    )
    tuned, started = (
        load_model(tmp_path / "tuned.safetensors"),
        load_model(tmp_path / "start.safetensors"),
    )
    changed = {
        name
        for name, tensor in started.state_dict().items()
        if not torch.equal(tuned.state_dict()[name], tensor)
    }
    assert not {name for name in changed if "running" in name or "batches" in name}
    assert {"head.weight", "down.0.0.weight"} <= changed  # while the weights did learn


def test_a_resumed_fine_tuning_run_stays_fine_tuning(tmp_path):
    """Resuming keeps the guard (the start's score), the start's batch-norm statistics and the
    pull toward the start's weights."""
    import torch

    from napari_tiled_unet.core.train import _Session, _Start, resumes_fine_tuning

    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    start = make_model(depth=2, base_channels=4, norm="batch", seed=5)
    save_model(start, tmp_path / "start.safetensors")
    output, polls = tmp_path / "tuned.safetensors", []
    config = quick(iterations=6, validate_every=3, anchor=5.0)
    stopped = list(
        train(
            samples,
            output,
            init=tmp_path / "start.safetensors",
            config=config,
            should_stop=lambda: polls.append(1) or len(polls) > 4,
        )
    )
    # the L2-SP pull goes on toward the --init weights, not the checkpoint's
    session = _Session.prepared(samples, output, config, _Start(None, None, None), True, bool)
    starting = dict(start.named_parameters())
    assert session.start_weights.keys() == starting.keys()
    assert all(torch.equal(session.start_weights[k], w) for k, w in starting.items())
    moved = sum(float(((w - starting[k]) ** 2).sum()) for k, w in session.model.named_parameters())
    assert moved > 0
    assert float(session._pull_to_start(session.model)) == pytest.approx(5.0 * moved, rel=1e-5)
    assert stopped[-1].stopped and stopped[-1].baseline["iteration"] == 0
    assert resumes_fine_tuning(output) and not resumes_fine_tuning(tmp_path / "none.safetensors")
    at_stop = torch.load(tmp_path / "tuned.checkpoint.pt", weights_only=True)
    resumed = list(train(samples, output, config=config, resume=True))
    assert [e.iteration for e in resumed] == [5, 6]
    assert resumed[-1].baseline == stopped[-1].baseline
    assert resumed[-1].best["iteration"] in (0, 3, 6)
    checkpoint = torch.load(tmp_path / "tuned.checkpoint.pt", weights_only=True)
    for name, tensor in start.state_dict().items():
        if "running" in name or "batches" in name:
            assert torch.equal(checkpoint["model"][name], tensor), name
    # a checkpoint from before runs kept their start cannot resume the pull: said, not skipped
    torch.save(dict(at_stop, start_weights=None), tmp_path / "tuned.checkpoint.pt")
    with pytest.raises(ValueError, match=r"anchor: the checkpoint .* holds no starting weights"):
        train(samples, output, config=config, resume=True)
    without = list(train(samples, output, config=replace(config, anchor=0.0), resume=True))
    assert [e.iteration for e in without] == [5, 6]


def test_fine_tuning_into_another_output_mode_pulls_only_the_kept_network(tmp_path):
    """A distance model started from a 2-class one: its new output layer learns freely, the
    rest is pulled toward the start (L2-SP), and the start's 2-class threshold is not kept."""
    import torch

    from napari_tiled_unet.core.train import _Session, _Start

    samples = [Sample(*touching_blobs(seed)) for seed in range(2)]
    start = make_model(depth=2, base_channels=4, norm="batch", seed=5)
    start.metadata = {"postprocess": {"threshold": 0.7, "min_size": 9}}
    save_model(start, tmp_path / "start.safetensors")
    config = quick(iterations=4, validate_every=4, anchor=5.0)
    begin = _Start(None, tmp_path / "start.safetensors", "distance")
    session = _Session.prepared(samples, tmp_path / "d.safetensors", config, begin, False, bool)
    assert session.model.config.output_mode == "distance" and begin.new_head
    starting = {k: v for k, v in start.named_parameters() if not k.startswith("head.")}
    assert session.start_weights.keys() == starting.keys()
    events = list(
        train(
            samples,
            tmp_path / "d.safetensors",
            config=config,
            init=tmp_path / "start.safetensors",
            mode="distance",
        )
    )
    assert [e.iteration for e in events] == [1, 2, 3, 4]
    tuned = load_model(tmp_path / "d.safetensors")
    assert tuned.config.output_mode == "distance" and tuned.config.n_classes == 3
    assert "postprocess" not in tuned.metadata
    last = torch.load(tmp_path / "d.checkpoint.pt", weights_only=True)["model"]
    assert float(last["head.weight"][2].abs().sum()) > 0  # the distance output learns
    same = _Start(None, tmp_path / "start.safetensors", "paper")
    assert same.model().config == start.config and not same.new_head
    with pytest.raises(ValueError, match=r"mode: changes the outputs of a model fine-tuned from"):
        train(
            samples, tmp_path / "x.safetensors", config=config, model_config=TINY, mode="distance"
        )
