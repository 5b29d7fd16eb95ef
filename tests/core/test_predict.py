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

    events = list(predict(model, image, out, tile=100, batch=3, device="cpu",
                          should_stop=stop_after_first_batch))
    assert events[-1].stopped
    assert events[-1].done == 3 and events[-1].total == 4 * 4  # 2 x 2 tiles of 100 px per plane
    assert [e.stopped for e in events[:-1]] == [False]
    assert (out >= 0).sum() < out.size  # the rest was never computed


def test_progress_counts_every_tile_once(rng):
    model = make_model(depth=2)
    image = rng.random((2, 100, 130), dtype=np.float32)
    events = list(predict(model, image, np.zeros(image.shape, np.float32), tile=100, batch=4,
                          device="cpu"))
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


@pytest.mark.parametrize("case, match", [
    (bad(np.zeros(30, np.float32)), "image: expected at least 2 axes"),
    (bad(np.zeros((0, 30), np.float32)), "image: expected a non-empty array"),
    (bad(np.array([["a", "b"]])), "image: expected a real numeric dtype"),
    (bad(np.zeros((5, 5), complex)), "image: expected a real numeric dtype"),
    (bad(np.array([[1.0, np.nan], [0.0, 1.0]], np.float32)), "NaN or Inf"),
    (bad(np.array([[1.0, np.inf], [0.0, 1.0]])), "NaN or Inf"),
    (bad(np.zeros((3, 30, 30), np.float32), channel_axis=0, in_channels=2), "expects 2 input channel"),
    (bad(in_channels=2), "expects 2 input channel"),
    (bad(np.zeros((3, 30, 30)), channel_axis=2), "channel_axis: the last two axes"),
    (bad(device="tpu"), "device: expected 'auto', 'cpu', 'cuda'"),
    (bad(device="cuda:0"), "device: 'cuda:0' requested, but no CUDA device"),
    (bad(tile=0), "tile: expected 'auto'"),
    (bad(batch=0), "batch: expected .auto. or a positive integer"),
    (bad(precision="fp8"), "precision: expected one of"),
    (bad(out=np.zeros((31, 30), np.float32)), r"out: expected shape \(30, 30\)"),
    (bad(out=np.zeros((30, 30), np.uint8)), "out: expected a float dtype"),
])
def test_bad_input_is_rejected_when_predict_is_called(case, match):
    with pytest.raises(ValueError, match=match):
        case()  # raised by the call itself, before the generator does any work


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
