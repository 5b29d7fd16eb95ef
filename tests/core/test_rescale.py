"""Objects at the model's size: lazy resampling, the way back, and diameter estimation."""

import numpy as np
import pytest
from scipy import ndimage

from napari_tiled_unet.core.model import UNet, UNetConfig
from napari_tiled_unet.core.normalize import Normalization
from napari_tiled_unet.core.rescale import Rescaled, back_to_original, working_factor
from napari_tiled_unet.core.segment import estimate_diameter, segment


class Threshold(UNet):
    """A 'network' whose foreground is the bright part of its input (geometry of depth 2)."""

    def forward(self, x):
        c = self.margin // 2
        return (x[:, :1, c : x.shape[-2] - c, c : x.shape[-1] - c] - 0.5) * 20


def threshold_model(diameter=20.0, diameter_range=None):
    model = Threshold(UNetConfig(depth=2, base_channels=2)).eval()
    metadata = {"diameter": diameter}
    if diameter_range is not None:
        metadata["diameter_range"] = diameter_range
    model.normalization, model.metadata = Normalization("none"), metadata
    return model


def discs(diameter, size, spacing):
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((size, size), np.float32)
    for cy in range(spacing // 2, size - diameter // 2, spacing):
        for cx in range(spacing // 2, size - diameter // 2, spacing):
            image[np.hypot(yy - cy, xx - cx) < diameter / 2] = 1
    return image


@pytest.mark.parametrize("factor", [2.0, 0.5, 1.7, 3.0, 1 / 3, 0.37, 0.125])
def test_any_window_of_a_rescaled_image_equals_the_whole(factor, rng):
    image = rng.random((2, 37, 53)).astype(np.float32)
    view = Rescaled(image, factor)
    whole = view[:, :, :]
    assert whole.shape == view.shape == (2, round(37 * factor), round(53 * factor))
    assert np.array_equal(view[1, 5:17, 3:30], whole[1, 5:17, 3:30])
    assert np.array_equal(view[0, ::3, ::2], whole[0, ::3, ::2])
    row, col = view.shape[1] - 1, view.shape[2] // 2  # the last row: footprints clipped there
    assert view[1, row, col] == whole[1, row, col]
    if factor == 2.0:  # linear, pixel centres aligned: scipy's zoom in grid mode
        reference = ndimage.zoom(image[0], 2.0, order=1, grid_mode=True, mode="nearest")
        assert np.abs(whole[0] - reference).max() < 1e-6


def test_shrinking_averages_each_footprint_like_larger_camera_pixels(rng):
    image = rng.random((3, 36, 54)).astype(np.float32)
    halved = Rescaled(image, 0.5)[:, :, :]
    binned = image.reshape(3, 18, 2, 27, 2).mean(axis=(2, 4))
    assert np.abs(halved - binned).max() < 1e-6
    # footprints of 1 / 0.4 = 2.5 px: working pixel 1 covers source [2.5, 5), so half of
    # pixel 2 and all of pixels 3 and 4: (0.5 * 2 + 3 + 4) / 2.5 = 3.2
    row = np.arange(10, dtype=np.float32)[None, :]
    assert Rescaled(row, 0.4)[0, :].tolist() == pytest.approx([0.8, 3.2, 5.8, 8.2], abs=1e-6)
    # fine noise is averaged away, not sampled: checkerboard -> its mean
    board = (np.indices((40, 40)).sum(axis=0) % 2).astype(np.float32)
    assert np.abs(Rescaled(board, 0.25)[:, :] - 0.5).max() < 1e-6


def test_factors_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"diameter: the scale factor must be within \[0.125, 8"):
        Rescaled(np.zeros((10, 10)), 20.0)


def test_labels_go_back_to_the_original_grid_with_ids_renumbered():
    labels = np.zeros((74, 106), np.uint32)
    labels[10:30, 10:30], labels[40:60, 50:80], labels[70, 100] = 4, 9, 12
    original, probability = back_to_original(labels, (labels > 0).astype(np.float32), (37, 53), 2.0)
    assert original.shape == probability.shape == (37, 53)
    assert sorted(np.unique(original)) == [0, 1, 2, 3]
    assert (original == 1).sum() == 100 and (original == 2).sum() == 150


def test_diameter_rescaling_keeps_shapes_and_finds_the_same_objects():
    model = threshold_model(diameter=20.0)
    small = discs(20, 300, 50)
    large = ndimage.zoom(small, 3, order=0)  # the same discs, 60 px across
    reference = [p for e in segment(model, small, device="cpu") for p in e.planes][0]
    events = list(segment(model, large, diameter=60.0, device="cpu"))
    plane = [p for e in events for p in e.planes][0]
    assert events[-1].factor == pytest.approx(1 / 3) and events[-1].diameter == 60.0
    assert plane.labels.shape == plane.probability.shape == large.shape
    assert plane.count == reference.count == 36  # 6 x 6 discs
    assert sorted(np.unique(plane.labels)) == list(range(37))


@pytest.mark.parametrize("diameter", [12, 20, 36, 60, 150])
def test_auto_recovers_a_known_object_size_within_15_percent(diameter):
    model = threshold_model(diameter=20.0)
    image = discs(diameter, max(600, 8 * diameter), int(diameter * 2.5))
    estimate = estimate_diameter(model, image, threshold=0.5, device="cpu")
    assert estimate == pytest.approx(diameter, rel=0.15)


def test_a_dense_small_image_is_not_taken_for_one_huge_object():
    # At 1/8 this 256 px window is 32 px: the discs blur into one blob that measured about
    # 200 px, which made the estimate 10x too large and the run refuse its own scale.
    model = threshold_model(diameter=20.0)
    image = discs(20, 256, 24)
    assert estimate_diameter(model, image, threshold=0.5, device="cpu") == pytest.approx(
        20, rel=0.15
    )
    events = list(segment(model, image, diameter="auto", device="cpu"))
    assert events[-1].factor == 1.0 and events[-1].planes[-1].count == 100


def test_small_objects_of_a_familiar_size_are_left_unscaled_and_large_ones_brought_down():
    metadata = {"diameter": 20.0, "diameter_range": [12.0, 40.0]}
    assert working_factor(metadata, 12.0) == working_factor(metadata, 19.0) == 1.0
    assert working_factor(metadata, 30.0) == pytest.approx(2 / 3)
    assert working_factor(metadata, 60.0) == pytest.approx(1 / 3)
    # smaller than any the model knows: up to the smallest it knows, not to its median size
    assert working_factor(metadata, 8.0) == pytest.approx(1.5)
    assert working_factor(metadata, 4.0) == pytest.approx(3.0)
    assert working_factor(metadata, 11.6) == 1.0  # within 5% of the range
    # no recorded range: only sizes within 5% of the model's count as its own
    assert working_factor({"diameter": 20.0}, 20.8) == 1.0
    assert working_factor({"diameter": 20.0}, 15.0) == pytest.approx(4 / 3)
    model = threshold_model(diameter=20.0, diameter_range=[12.0, 40.0])
    for size, factor, count in ((15, 1.0, 16 * 16), (60, 1 / 3, 4 * 4)):
        image = discs(size, 600, int(size * 2.5))
        events = list(segment(model, image, diameter="auto", device="cpu"))
        assert events[-1].diameter == pytest.approx(size, rel=0.15)
        assert events[-1].factor == pytest.approx(factor, rel=0.15)
        assert events[-1].planes[-1].count == count


def test_diameter_needs_a_model_that_knows_its_size():
    model = threshold_model(diameter=None)
    with pytest.raises(
        ValueError, match="diameter: this model records no training object diameter"
    ):
        segment(model, np.zeros((64, 64), np.float32), diameter="auto", device="cpu")
    with pytest.raises(ValueError, match="diameter: expected a positive number"):
        segment(threshold_model(), np.zeros((64, 64), np.float32), diameter=-3, device="cpu")
