import numpy as np
import pytest

from napari_tiled_unet.core.tiling import mirror_indices, mirror_pad, plan_axis

from ..conftest import make_model


@pytest.mark.parametrize("length", [2, 3, 7])
@pytest.mark.parametrize("pad", [0, 1, 6, 25])
def test_mirror_indices_match_numpy_reflect_even_when_padding_exceeds_the_image(length, pad):
    values = np.arange(length)
    expected = np.pad(values, pad, mode="reflect")
    assert (values[mirror_indices(-pad, length + 2 * pad, length)] == expected).all()


def test_one_pixel_axis_mirrors_to_itself():
    assert (mirror_indices(-5, 11, 1) == 0).all()
    assert mirror_pad(np.array([[7.0]]), (3, 2), (4, 1)).tolist() == [[7.0] * 4] * 8


@pytest.mark.parametrize("length", [1, 5, 17, 300, 1025])
@pytest.mark.parametrize("tile", [1, 60, 200, 5000])
def test_plan_covers_the_axis_on_the_pooling_grid(length, tile):
    model = make_model(depth=3)
    plan = plan_axis(length, tile, model)
    covered = np.zeros(length, bool)
    for start in plan.positions:
        covered[start : start + plan.output_size] = True
    assert covered.all()
    assert all(p % model.size_step == 0 for p in plan.positions)
    assert model.output_size(plan.input_size) == plan.output_size
    assert plan.positions[-1] < length


def test_tile_larger_than_the_image_shrinks_to_the_smallest_covering_tile():
    model = make_model(depth=4)
    plan = plan_axis(300, 5000, model)
    assert plan.positions == (0,)
    assert plan.input_size == model.legal_input_size(300) == 492
