"""Overlap-tile prediction equals one forward pass over the whole mirror-padded image."""

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_tiled_unet.core.predict import predict, predict_array

from ..conftest import make_model, whole_image_reference

TOLERANCE = 1e-5


def tiled(model, image, **options):
    return predict_array(model, image, device="cpu", precision="fp32", **options)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (1, 517), (300, 7), (511, 1025)])
def test_tiles_smaller_and_larger_than_the_image_match_the_whole_image(depth, shape, rng):
    model = make_model(depth=depth, base_channels=2, seed=depth)
    image = rng.random(shape, dtype=np.float32)
    reference = whole_image_reference(model, image[None])
    smallest = model.legal_input_size(model.size_step)
    small_tile = smallest + 3 * model.size_step if max(shape) > 100 else 1
    for tile in (small_tile, 2 * max(shape) + model.margin):
        result = tiled(model, image, tile=tile, batch=3)
        assert result.shape == shape
        assert np.abs(result - reference).max() <= TOLERANCE


@pytest.mark.parametrize("stack_shape", [(3, 70, 90), (2, 2, 45, 61)])
def test_stacks_match_plane_by_plane_references(stack_shape, rng):
    model = make_model(depth=2, base_channels=3)
    stack = rng.random(stack_shape, dtype=np.float32)
    result = tiled(model, stack, tile=60, batch=5)  # batches span planes
    assert result.shape == stack_shape
    for index in np.ndindex(*stack_shape[:-2]):
        reference = whole_image_reference(model, stack[index][None])
        assert np.abs(result[index] - reference).max() <= TOLERANCE


def test_two_channel_input_with_a_channel_axis_between_z_and_y(rng):
    model = make_model(depth=2, base_channels=3, in_channels=2)
    stack = rng.random((3, 2, 50, 77), dtype=np.float32)  # (Z, C, Y, X)
    result = tiled(model, stack, channel_axis=1, tile=56, batch=2)
    assert result.shape == (3, 50, 77)
    for z in range(3):
        reference = whole_image_reference(model, stack[z])
        assert np.abs(result[z] - reference).max() <= TOLERANCE


def test_zarr_and_dask_inputs_stream_into_a_zarr_output(rng, tmp_path):
    model = make_model(depth=2, base_channels=2)
    stack = (rng.random((2, 90, 70)) * 4000).astype(np.uint16)
    source = zarr.open(
        str(tmp_path / "in.zarr"),
        mode="w",
        shape=stack.shape,
        chunks=(1, 32, 32),
        dtype=stack.dtype,
    )
    source[:] = stack
    expected = tiled(model, stack, tile=64)
    for image in (source, da.from_array(stack, chunks=(1, 40, 40))):
        out = zarr.open(
            str(tmp_path / "out.zarr"),
            mode="w",
            shape=stack.shape,
            chunks=(1, 50, 50),
            dtype="float32",
        )
        for _ in predict(model, image, out, tile=64, device="cpu"):
            pass
        assert np.abs(out[:] - expected).max() == 0


def test_all_class_probabilities_sum_to_one_and_match_foreground(rng):
    model = make_model(depth=2, base_channels=2, n_classes=3)
    image = rng.random((40, 50), dtype=np.float32)
    classes = tiled(model, image, output="classes", tile=50)
    assert classes.shape == (3, 40, 50)
    assert np.abs(classes.sum(axis=0) - 1).max() < 1e-5
    assert np.abs(tiled(model, image, tile=50) - classes[1]).max() <= TOLERANCE


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(1, 2),
    height=st.integers(1, 90),
    width=st.integers(1, 90),
    tile_y=st.integers(1, 150),
    tile_x=st.integers(1, 150),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_tile_is_exact(depth, height, width, tile_y, tile_x, batch, seed):
    model = make_model(depth=depth, base_channels=2, seed=seed % 7)
    image = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    result = tiled(model, image, tile=(tile_y, tile_x), batch=batch)
    assert np.abs(result - whole_image_reference(model, image[None])).max() <= TOLERANCE
