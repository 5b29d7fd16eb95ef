import numpy as np
import pytest

from napari_tiled_unet.core.postprocess import instance_labels, label_plane, labels_dtype


def test_components_are_8_connected_and_small_ones_dropped():
    probability = np.zeros((8, 8), np.float32)
    probability[1:3, 1:3] = 0.9  # 4 px
    probability[3, 3] = 0.8      # touches the first diagonally -> same object
    probability[6, 6] = 0.7      # 1 px, dropped by min_size=2
    probability[5:8, 0] = 0.5    # exactly the threshold -> background
    labels = label_plane(probability, threshold=0.5, min_size=2)
    assert labels.max() == 1
    assert (labels > 0).sum() == 5


def test_stack_planes_are_labelled_separately_with_the_smallest_dtype():
    probability = np.zeros((2, 10, 10), np.float32)
    probability[0, ::3, ::3] = 1  # 16 separate pixels
    probability[1, :2, :2] = 1
    labels = instance_labels(probability)
    assert labels.dtype == np.uint8
    assert [int(p.max()) for p in labels] == [16, 1]


@pytest.mark.parametrize("count, dtype", [(255, np.uint8), (256, np.uint16), (70000, np.uint32)])
def test_dtype_is_chosen_by_count(count, dtype):
    assert labels_dtype(count) == dtype


@pytest.mark.parametrize("options, match", [({"threshold": 1.0}, "threshold"),
                                             ({"min_size": -1}, "min_size")])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        instance_labels(np.zeros((3, 3)), **options)


def test_options_come_from_the_caller_then_the_model_then_the_defaults():
    from napari_tiled_unet.core.postprocess import postprocess_options

    recommended = {"postprocess": {"threshold": 0.7, "min_size": 25}}
    assert postprocess_options(recommended) == (0.7, 25)
    assert postprocess_options(recommended, 0.4, None) == (0.4, 25)
    assert postprocess_options(recommended, None, 0) == (0.7, 0)
    assert postprocess_options({}) == (0.5, 0)
    assert postprocess_options(None, None, 3) == (0.5, 3)
    with pytest.raises(ValueError, match="threshold: expected a number in"):
        postprocess_options(recommended, 1.5)
