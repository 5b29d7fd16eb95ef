import numpy as np
import pytest

from napari_tiled_unet.core.normalize import Normalization
from napari_tiled_unet.core.predict import predict, predict_array

from ..conftest import make_model


def test_should_stop_ends_the_run_within_one_batch(rng):
    model = make_model(depth=2)
    image = rng.random((4, 100, 100), dtype=np.float32)
    out = np.full(image.shape, -1.0, np.float32)
    polls = []

    def stop_after_first_batch():
        polls.append(1)
        return len(polls) > 2  # the engine has submitted two batches by the third poll

    events = list(
        predict(
            model, image, out, tile=100, batch=3, device="cpu", should_stop=stop_after_first_batch
        )
    )
    assert events[-1].stopped
    assert events[-1].done == 3 and events[-1].total == 4 * 4  # 2 x 2 tiles of 100 px per plane
    assert [e.stopped for e in events[:-1]] == [False]
    assert (out >= 0).sum() < out.size  # the rest was never computed


def test_progress_counts_every_tile_once(rng):
    model = make_model(depth=2)
    image = rng.random((2, 100, 130), dtype=np.float32)
    events = list(
        predict(model, image, np.zeros(image.shape, np.float32), tile=100, batch=4, device="cpu")
    )
    # 100-px input tiles predict 60 px: 2 rows x 3 columns per plane, 2 planes.
    assert [e.done for e in events] == [4, 8, 12]
    assert [e.planes_done for e in events] == [0, 1, 2]
    assert events[-1].total == 12 and not events[-1].stopped


def test_normalisation_is_per_plane_and_matches_manual_scaling(rng):
    model = make_model(depth=2)
    image = (rng.random((60, 70)) * 3000 + 100).astype(np.uint16)
    norm = Normalization("percentile", 1.0, 99.8)
    low, high = np.percentile(image.astype(np.float64), [1.0, 99.8])
    manual = ((image - low) / (high - low)).astype(np.float32)
    scaled = predict_array(model, image, normalization=norm, tile=64)
    assert np.abs(scaled - predict_array(model, manual, tile=64)).max() < 1e-5


def bad(image=None, **options):
    model = make_model(depth=2, in_channels=options.pop("in_channels", 1))
    image = np.zeros((30, 30), np.float32) if image is None else image
    out = options.pop("out", np.zeros(np.shape(image)[-2:], np.float32))
    return lambda: predict(model, image, out, **options)


@pytest.mark.parametrize(
    "case, match",
    [
        (bad(np.zeros(30, np.float32)), "image: expected at least 2 axes"),
        (bad(np.zeros((0, 30), np.float32)), "image: expected a non-empty array"),
        (bad(np.array([["a", "b"]])), "image: expected a real numeric dtype"),
        (bad(np.zeros((5, 5), complex)), "image: expected a real numeric dtype"),
        (bad(np.array([[1.0, np.nan], [0.0, 1.0]], np.float32)), "NaN or Inf"),
        (bad(np.array([[1.0, np.inf], [0.0, 1.0]])), "NaN or Inf"),
        (bad(np.array([[1.0, 1e39], [0.0, 1.0]])), "image: values beyond the float32 range"),
        (
            bad(np.zeros((3, 30, 30), np.float32), channel_axis=0, in_channels=2),
            "expects 2 input channel",
        ),
        (bad(in_channels=2), "expects 2 input channel"),
        (bad(np.zeros((3, 30, 30)), channel_axis=2), "channel_axis: the last two axes"),
        (bad(device="tpu"), "device: expected 'auto', 'cpu', 'cuda'"),
        (bad(tile=0), "tile: expected 'auto'"),
        (bad(batch=0), "batch: expected .auto. or a positive integer"),
        (bad(precision="fp8"), "precision: expected one of"),
        (bad(out=np.zeros((31, 30), np.float32)), r"out: expected shape \(30, 30\)"),
        (bad(out=np.zeros((30, 30), np.uint8)), "out: expected a float dtype"),
    ],
)
def test_bad_input_is_rejected_when_predict_is_called(case, match):
    with pytest.raises(ValueError, match=match):
        case()  # raised by the call itself, before the generator does any work


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="device: 'cuda:0' requested, but no CUDA device"):
        bad(device="cuda:0")()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float64])
def test_raw_tiles_travel_in_their_own_dtype_and_match_float_input(dtype, rng):
    model = make_model(depth=2, base_channels=3)
    image = rng.integers(0, 120, (2, 90, 70)).astype(dtype)
    norm = Normalization("percentile", 1.0, 99.0)
    reference = predict_array(model, image.astype(np.float32), normalization=norm, tile=60)
    result = predict_array(model, image, normalization=norm, tile=60)
    assert np.abs(result - reference).max() <= 1e-6


def test_channel_padded_first_layer_gives_the_same_output(rng):
    """On CUDA the first convolution is padded to 8 input channels for tensor cores; the extra
    zero channels must not change a single value (checked here on the CPU)."""
    import torch

    from napari_tiled_unet.core.predict import _ChannelPadded

    model = make_model(depth=2, base_channels=4, in_channels=3)
    x = torch.from_numpy(rng.random((2, 3, 92, 92), dtype=np.float32))
    with torch.no_grad():
        expected = model(x)
        padded = _ChannelPadded(model)(x)
    assert padded.shape == expected.shape and torch.allclose(padded, expected, atol=1e-6)
    assert model.down[0][0].in_channels == 3  # the caller's model is left as it was


def test_a_failing_compiler_falls_back_to_the_plain_network(rng, monkeypatch):
    import torch

    calls = []

    def broken_compile(network, **options):
        def compiled(x):
            calls.append(x.shape)
            raise RuntimeError("inductor: no C++ compiler (simulated)")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = make_model(depth=2)
    image = rng.random((2, 80, 80), dtype=np.float32)
    expected = predict_array(model, image, tile=64, compile=False)
    assert np.array_equal(predict_array(model, image, tile=64, compile=True), expected)
    assert len(calls) == 1  # tried once, then the plain network for every batch
    with pytest.raises(ValueError, match="compile: expected 'auto', True or False"):
        predict_array(model, image, compile="yes")


def test_out_of_memory_retries_with_a_smaller_tile_and_stays_exact(rng, monkeypatch):
    import torch

    from napari_tiled_unet.core import predict as engine

    model = make_model(depth=2)
    image = rng.random((2, 150, 170), dtype=np.float32)
    expected = predict_array(model, image, tile=200)
    real = engine._Runner._probabilities
    seen = []

    def small_gpu(self, x):
        seen.append(tuple(x.shape[-2:]))
        if max(x.shape[-2:]) > 120:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x)

    monkeypatch.setattr(engine._Runner, "_probabilities", small_gpu)
    out = np.zeros(image.shape, np.float32)
    events = list(predict(model, image, out, tile=200, batch=2))
    assert max(seen[0]) > 120 and max(events[-1].tile_shape) <= 120
    assert events[-1].done == events[-1].total and events[-1].planes_done == 2
    assert np.abs(out - expected).max() <= 1e-5


def test_a_tile_below_the_smallest_is_raised_with_a_warning(rng):
    from napari_tiled_unet.core.predict import smallest_tile

    model = make_model(depth=2)
    image = rng.random((50, 50), dtype=np.float32)
    with pytest.warns(
        UserWarning,
        match=f"tile: 10 px is below this model's smallest tile \\({smallest_tile(model)} px\\)",
    ):
        result = predict_array(model, image, tile=10)
    assert np.abs(result - predict_array(model, image, tile=smallest_tile(model))).max() <= 1e-6


def test_lazy_float64_beyond_float32_is_an_error_not_nan_probabilities():
    import dask.array as da

    image = np.zeros((2, 40, 40))
    image[1, 5, 5] = 1e39
    with pytest.raises(ValueError, match="image: values beyond the float32 range"):
        predict_array(make_model(depth=2), da.from_array(image, chunks=(1, 40, 40)))


@pytest.mark.parametrize(
    ("region", "tile"),
    [
        ((slice(0, 44), slice(0, 300)), 60),  # a band at the top border
        ((slice(96, 200), slice(160, 310)), 64),  # inside, reaching the right border
        ((slice(4, 8), slice(296, 310)), "auto"),  # a tiny block
    ],
)
def test_a_region_equals_the_same_block_of_a_whole_plane_pass(region, tile, rng):
    """Only the block and its context are read, mirrored at the image's own borders: the same
    numbers as the whole plane, cropped (a block's own mirroring would differ)."""
    model = make_model(depth=2, base_channels=4)
    image = rng.integers(0, 255, (2, 230, 310), np.uint8)
    whole = predict_array(model, image, normalization=Normalization())
    out = np.zeros(
        (2, region[0].stop - region[0].start, region[1].stop - region[1].start), np.float32
    )
    for _ in predict(model, image, out, normalization=Normalization(), region=region, tile=tile):
        pass
    np.testing.assert_allclose(out, whole[(slice(None), *region)], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("region", "match"),
    [
        ((slice(2, 50), slice(0, 50)), "starting at multiples of the model's pooling step 4"),
        ((slice(0, 50, 2), slice(0, 50)), "without step"),
        ((slice(40, 40), slice(0, 50)), "non-empty"),
        ([slice(0, 8), slice(0, 8)], "a \\(Y, X\\) pair of slices"),
    ],
)
def test_a_bad_region_is_refused_before_work(region, match):
    model = make_model()
    with pytest.raises(ValueError, match=f"region: .*{match}"):
        predict(model, np.zeros((64, 64), np.float32), np.zeros((8, 8), np.float32), region=region)
