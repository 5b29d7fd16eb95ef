import numpy as np
import pytest

from napari_tiled_unet.core.postprocess import instance_labels, label_plane, labels_dtype


def test_components_are_8_connected_and_small_ones_dropped():
    probability = np.zeros((8, 8), np.float32)
    probability[1:3, 1:3] = 0.9  # 4 px
    probability[3, 3] = 0.8  # touches the first diagonally -> same object
    probability[6, 6] = 0.7  # 1 px, dropped by min_size=2
    probability[5:8, 0] = 0.5  # exactly the threshold -> background
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


@pytest.mark.parametrize(
    "options, match", [({"threshold": 1.0}, "threshold"), ({"min_size": -1}, "min_size")]
)
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


def test_z_linking_gives_one_id_per_object_through_the_stack():
    from napari_tiled_unet.core.postprocess import ZLinker

    stack = np.zeros((4, 20, 20), np.uint32)
    stack[0:3, 2:8, 2:8] = 1  # a nucleus in planes 0-2
    stack[1:4, 10:16, 10:16] = 2  # another in planes 1-3 (id 2 from plane 1 on)
    stack[1, 10:16, 10:16] = 1  # ... labelled 1 in plane 1, where it is the first object
    stack[1, 2:8, 2:8] = 2
    stack[3, 2:4, 2:4] = 1  # a small new object where the first one was
    linker = ZLinker(0.5)
    linked = np.stack([linker.link(plane) for plane in stack])
    assert len({int(v) for v in linked[0:3, 4, 4]}) == 1  # first nucleus: one id
    assert len({int(v) for v in linked[1:4, 12, 12]}) == 1  # second nucleus: one id
    assert linked[0, 4, 4] != linked[1, 12, 12]
    assert linked[3, 2, 2] not in (linked[0, 4, 4], linked[1, 12, 12])  # IoU 4/36: new
    assert sorted(np.unique(linked)) == [0, 1, 2, 3]
    restarted = ZLinker(0.5)
    restarted.link(stack[0])
    assert restarted.link(stack[0], new_stack=True)[4, 4] == 2  # a new Z series: new ids
    with pytest.raises(ValueError, match=r"link_z: expected an IoU in \(0, 1\]"):
        ZLinker(0)
