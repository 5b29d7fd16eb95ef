import pytest

from napari_tiled_unet.core.shapes import (
    leading_shape,
    normalised_axis,
    output_shape,
    without_channel,
)


def test_the_shape_helpers_agree_on_the_channel_axis():
    shape = (5, 2, 30, 40)  # Z, C, Y, X
    assert output_shape(shape, 1) == output_shape(shape, -3) == (5, 30, 40)
    assert leading_shape(shape, 1) == (5,) and leading_shape(shape, None) == (5, 2)
    assert without_channel("ZCYX", 1) == ("Z", "Y", "X")
    assert normalised_axis(-3, 4) == 1 and normalised_axis(None, 4) is None
    for bad in (4, -5, 1.0, True):
        with pytest.raises(ValueError, match=r"^channel_axis: expected an axis index in \[-4, 3\]"):
            output_shape(shape, bad)
