import numpy as np
import pytest
import tifffile
from napari_tiled_unet.sample_data import make_big_stack


def test_big_stack_is_a_mosaic_of_the_samples_with_matching_labels(tmp_path):
    samples = make_big_stack.load_samples()
    image_path, labels_path = make_big_stack.write_stack(
        tmp_path / "big.tif", planes=3, size=600, seed=2
    )
    image, labels = tifffile.imread(image_path), tifffile.imread(labels_path)
    assert image.shape == labels.shape == (3, 600, 600)
    assert image.dtype == np.uint8 and labels.dtype == np.uint32
    assert tifffile.TiffFile(image_path).series[0].axes == "ZYX"
    # plane 0 is the first mosaic drawn from the seed, labels included
    rng = np.random.default_rng(2)
    first_image, first_labels = make_big_stack.mosaic_plane(samples, 600, rng)
    np.testing.assert_array_equal(image[0], first_image)
    np.testing.assert_array_equal(labels[0], first_labels)
    objects_per_sample = [int(truth.max()) for _, truth in samples]
    assert labels[0].max() >= min(objects_per_sample)
    # the same seed gives the same stack; labels sit on nuclei (bright), background on dark pixels
    again, _ = make_big_stack.write_stack(tmp_path / "again.tif", planes=3, size=600, seed=2)
    np.testing.assert_array_equal(tifffile.imread(again), image)
    assert image[labels > 0].mean() > 3 * image[labels == 0].mean()


def test_big_stack_refuses_to_replace_a_file(tmp_path, capsys):
    target = tmp_path / "big.tif"
    target.write_bytes(b"keep")
    with pytest.raises(SystemExit):
        make_big_stack.main([str(target), "--planes", "1", "--size", "64"])
    assert "exists" in capsys.readouterr().err and target.read_bytes() == b"keep"
