"""The bundled nuclei model: it loads, segments the samples well, and is the CLI's default."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_tiled_unet import cli
from napari_tiled_unet.core.metrics import match_objects
from napari_tiled_unet.core.modelfile import load_model
from napari_tiled_unet.core.postprocess import decode_plane, postprocess_options
from napari_tiled_unet.core.predict import predict_array
from napari_tiled_unet.models import DEFAULT_MODEL

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL)


def sample(stem):
    return (
        tifffile.imread(SAMPLES / f"{stem}_image.tif"),
        tifffile.imread(SAMPLES / f"{stem}_labels.tif"),
    )


def segmented(model, image):
    threshold, min_size, split, min_peak = postprocess_options(model.metadata)
    maps = predict_array(model, image)
    return decode_plane(maps, threshold, min_size, "paper", split, min_peak)


def test_bundled_model_is_small_valid_padding_and_documented(model):
    assert DEFAULT_MODEL.stat().st_size <= 10_000_000
    assert model.config.padding == "valid" and model.config.in_channels == 1
    assert model.metadata["loss"]["weights"] == "paper"
    assert len(model.metadata["validation_samples"]) == 49
    threshold, min_size, split, min_peak = postprocess_options(model.metadata)
    assert 0 < threshold < 1 and min_size >= 0 and split >= 0 and 0 <= min_peak < 1
    assert (DEFAULT_MODEL.parent / "MODEL_CARD.md").is_file()


@pytest.mark.parametrize(
    "stem, least_ap",
    [
        ("nuclei_a", 0.8),  # among the training images
        ("nuclei_c", 0.8),  # held out: never trained on
    ],
)
def test_bundled_model_segments_the_sample_nuclei(model, stem, least_ap):
    image, truth = sample(stem)
    scores = match_objects(segmented(model, image), truth, 0.5)
    assert scores.ap >= least_ap
    found, true = scores.tp + scores.fp, scores.tp + scores.fn
    assert abs(found - true) <= 0.1 * true


def test_segment_without_model_uses_the_bundled_one(model, tmp_path, capsys):
    image, _ = sample("nuclei_a")
    output = tmp_path / "labels.tif"
    assert (
        cli.main(["segment", str(SAMPLES / "nuclei_a_image.tif"), "-o", str(output), "--quiet"])
        == 0
    )
    expected = segmented(model, image)
    np.testing.assert_array_equal(tifffile.imread(output), expected)
    assert (
        capsys.readouterr().out.strip() == f"{output}: {int(expected.max())} objects in 1 plane(s)"
    )


@pytest.mark.parametrize("stem", ["nuclei_b", "nuclei_c"])
def test_a_3x_upscaled_sample_is_segmented_as_well_with_auto_diameter(model, stem):
    from scipy import ndimage

    from napari_tiled_unet.core.metrics import median_diameter
    from napari_tiled_unet.core.segment import segment

    image, truth = sample(stem)
    if image.shape[0] > 300:
        image, truth = image[:256, :256], truth[:256, :256]  # keep the test quick
    original = match_objects(segmented(model, image), truth, 0.5).ap
    large, large_truth = ndimage.zoom(image, 3, order=1), ndimage.zoom(truth, 3, order=0)
    events = list(segment(model, large, diameter="auto", device="cpu"))
    (plane,) = [p for e in events for p in e.planes]
    true_factor = model.metadata["diameter"] / (3 * median_diameter([truth]))
    assert events[-1].factor == pytest.approx(true_factor, rel=0.15)
    assert plane.labels.shape == large.shape
    assert match_objects(plane.labels, large_truth, 0.5).ap >= original - 0.05
