import numpy as np
import pytest

from napari_tiled_unet.core.channels import GreyView, fit_colours
from napari_tiled_unet.core.io import LazyImage


@pytest.mark.parametrize(
    "key", [(1, slice(2, 9), slice(None)), (Ellipsis, slice(0, 4)), (0,), (slice(None), 3, 5)]
)
def test_grey_view_reads_the_mean_of_red_green_and_blue(key, rng):
    data = rng.integers(0, 255, (2, 4, 10, 12), dtype=np.uint8)  # (Z, RGBA, Y, X)
    grey = data[:, :3].mean(axis=1, dtype=np.float32)
    view = GreyView(data, axis=1)
    assert view.shape == (2, 10, 12) and view.dtype == np.float32
    np.testing.assert_array_equal(view[key], grey[key])
    np.testing.assert_array_equal(np.asarray(view), grey)


def test_only_colour_samples_are_averaged_and_only_for_one_channel_models(rng):
    data = rng.random((3, 8, 8)).astype(np.float32)
    colour = LazyImage(data, "SYX", 0)
    fitted, said = fit_colours(colour, 1)
    assert fitted.axes == "YX" and fitted.channel_axis is None and said
    assert fit_colours(colour, 3) == (colour, None)  # colours as a 3-channel model's input
    channels = LazyImage(data, "CYX", 0)
    assert fit_colours(channels, 1) == (channels, None)  # channels are never averaged
