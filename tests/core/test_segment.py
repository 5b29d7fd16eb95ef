"""The streaming segment step that the CLI and the Segment widget both drain."""

import numpy as np
import pytest

from napari_tiled_unet.core.postprocess import label_boundary_plane, label_plane
from napari_tiled_unet.core.predict import predict_array
from napari_tiled_unet.core.segment import segment

from ..conftest import make_model


def test_planes_come_in_order_and_equal_labelling_the_engine_output(rng):
    model = make_model(depth=2, base_channels=3)
    stack = rng.random((5, 70, 90), dtype=np.float32)
    expected = predict_array(model, stack, tile=60, batch=3, device="cpu")
    events = list(segment(model, stack, threshold=0.5, min_size=3, tile=60, batch=3, device="cpu"))
    planes = [plane for event in events for plane in event.planes]
    assert [p.index for p in planes] == [0, 1, 2, 3, 4]
    assert [p.lead for p in planes] == [(0,), (1,), (2,), (3,), (4,)]
    assert events[-1].planes_done == events[-1].planes_total == 5
    assert events[-1].done == events[-1].total and not events[-1].stopped
    for plane in planes:
        assert np.array_equal(plane.probability, expected[plane.index])
        assert np.array_equal(plane.labels, label_plane(expected[plane.index], 0.5, 3))
        assert plane.count == int(plane.labels.max())


def test_defaults_come_from_the_model_recommendation(rng):
    model = make_model(depth=2)
    model.metadata = {"postprocess": {"threshold": 0.45, "min_size": 4}}
    image = rng.random((64, 64), dtype=np.float32)
    (plane,) = [p for e in segment(model, image, device="cpu") for p in e.planes]
    assert np.array_equal(plane.labels, label_plane(predict_array(model, image), 0.45, 4))


def test_a_stop_ends_the_run_without_handing_out_unfinished_planes(rng):
    model = make_model(depth=2)
    stack = rng.random((6, 100, 100), dtype=np.float32)
    polls = []
    events = list(
        segment(
            model,
            stack,
            tile=100,
            batch=2,
            device="cpu",
            should_stop=lambda: polls.append(1) or len(polls) > 3,
        )
    )
    assert events[-1].stopped
    handed = [p.index for e in events for p in e.planes]
    assert handed == list(range(len(handed))) and len(handed) < 6
    assert events[-1].done < events[-1].total


def test_a_three_class_model_is_decoded_by_watershed_from_interiors(rng):
    model = make_model(depth=2, n_classes=3)
    image = rng.random((2, 64, 80), dtype=np.float32)
    classes = predict_array(model, image, output="classes", device="cpu")
    planes = [p for e in segment(model, image, threshold=0.3, device="cpu") for p in e.planes]
    for plane in planes:
        assert np.array_equal(plane.labels, label_boundary_plane(classes[plane.index], 0.3))
        assert np.allclose(plane.probability, 1 - classes[plane.index, 0], atol=1e-6)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"threshold": 1.5}, "threshold: expected a number in"),
        ({"min_size": -2}, "min_size: expected a non-negative integer"),
        ({"min_peak": 2.0}, r"min_peak: expected a number in \[0, 1\], got 2.0"),
        ({"workers": 0}, "workers: expected a positive integer"),
        ({"channel_axis": 5}, "channel_axis: expected an axis index"),
        ({"tile": -1}, "tile: expected"),
    ],
)
def test_bad_options_are_rejected_before_any_work(options, match):
    model = make_model(depth=2)
    with pytest.raises(ValueError, match=match):
        segment(model, np.zeros((40, 40), np.float32), device="cpu", **options)


def test_a_non_array_gets_the_engines_message():
    with pytest.raises(ValueError, match="image: expected an array"):
        segment(make_model(depth=2), [[1, 2], [3, 4]])
