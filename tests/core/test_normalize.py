import numpy as np
import pytest

from napari_tiled_unet.core.normalize import Normalization, _percentiles


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16])
@pytest.mark.parametrize("size", [1, 2, 7, 1000, 123457])
def test_histogram_percentiles_equal_numpys(dtype, size, rng):
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size, endpoint=True).astype(dtype)
    for percents in [(1.0, 99.8), (0.0, 100.0), (50.0, 50.5), (33.3, 66.6)]:
        assert np.array_equal(
            _percentiles(values, percents), np.percentile(values.astype(np.float64), percents)
        )


def test_plane_stats_of_integer_and_float_planes_agree(rng):
    plane = rng.integers(0, 4000, (1, 300, 200)).astype(np.uint16)
    norm = Normalization("percentile", 2.0, 98.0)
    for a, b in zip(norm.plane_stats(plane), norm.plane_stats(plane.astype(np.float32))):
        assert np.array_equal(a, b)
