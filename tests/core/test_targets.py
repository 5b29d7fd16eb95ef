import numpy as np
import pytest
import torch

from napari_tiled_unet.core.postprocess import label_boundary_plane, label_plane
from napari_tiled_unet.core.targets import class_target, n_classes_of, output_mode


def test_boundary_classes_mark_the_rim_and_the_seam_between_touching_objects():
    ids = np.zeros((7, 9), np.int64)
    ids[1:6, 1:4] = 1
    ids[1:6, 4:8] = 2  # touches object 1 along a column
    target = class_target(torch.from_numpy(ids)[None], 3)[0].numpy()
    expected = np.zeros((7, 9), np.int64)
    expected[1:6, 1:8] = 2  # every object pixel next to another id...
    expected[2:5, 2] = 1  # ...but the interiors
    expected[2:5, 5:7] = 1
    assert np.array_equal(target, expected)
    assert np.array_equal(class_target(torch.from_numpy(ids)[None], 2)[0].numpy(), (ids > 0) * 1)


def test_patch_edges_are_not_boundaries():
    ids = torch.ones(1, 4, 4, dtype=torch.int64)  # an object that continues past the patch
    assert (class_target(ids, 3) == 1).all()


def test_modes_and_class_counts():
    assert output_mode(2) == "paper" and output_mode(3) == "boundary"
    assert n_classes_of("boundary") == 3 and n_classes_of("paper") == 2
    assert n_classes_of("distance") == 3
    with pytest.raises(ValueError, match="n_classes: expected 2 .paper. or 3 .boundary., got 4"):
        output_mode(4)
    with pytest.raises(ValueError, match="mode: expected one of"):
        n_classes_of("watershed")


def test_a_distance_config_says_its_mode_and_old_files_keep_theirs():
    from napari_tiled_unet.core.config import UNetConfig

    assert UNetConfig(n_classes=3).output_mode == "boundary"
    distance = UNetConfig(n_classes=3, mode="distance")
    assert distance.output_mode == "distance"
    assert UNetConfig.from_dict(distance.to_dict()) == distance
    assert "mode" not in UNetConfig(n_classes=2).to_dict()  # readable by older versions
    with pytest.raises(
        ValueError, match="mode: expected one of .* got 'distance' with n_classes=2"
    ):
        UNetConfig(n_classes=2, mode="distance")


def test_the_distance_target_is_one_at_each_centre_and_falls_to_the_edges():
    from napari_tiled_unet.core.targets import distance_target

    ids = np.zeros((1, 11, 20), np.int64)
    ids[0, 1:10, 1:10] = 1  # 9 x 9 squares that touch along a column
    ids[0, 1:10, 10:19] = 2
    target = distance_target(torch.from_numpy(ids))[0].numpy()
    assert target[5, 5] == target[5, 14] == 1.0  # the centres
    assert target[0].max() == 0 and target[:, 0].max() == 0  # background
    rim = 1.0 / 5.0  # rim pixels are 1 px from the edge; the centre is 5 px from it
    np.testing.assert_allclose(target[5, [1, 9, 10, 18]], rim)
    np.testing.assert_allclose(target[5, 1:6], [0.2, 0.4, 0.6, 0.8, 1.0])


def test_distance_peaks_seed_a_watershed_that_splits_touching_objects():
    from napari_tiled_unet.core.postprocess import decode_plane

    maps = np.zeros((3, 11, 20), np.float32)
    maps[0], maps[1, 1:10, 1:19] = 1.0, 1.0
    maps[0, 1:10, 1:19] = 0.0
    yy, xx = np.mgrid[:11, :20]
    for cx in (5, 14):  # two cones on one foreground region
        maps[2] = np.maximum(maps[2], 1.0 - np.hypot(yy - 5, xx - cx) / 6)
    labels = decode_plane(maps, 0.5, 0, mode="distance")
    assert labels.max() == 2 and labels[5, 5] != labels[5, 14]
    assert (labels > 0).sum() == 9 * 18


def test_watershed_splits_a_touching_pair_that_a_threshold_merges():
    yy, xx = np.mgrid[:40, :60]
    left, right = np.hypot(yy - 20, xx - 20) < 10, np.hypot(yy - 20, xx - 37) < 10
    foreground = left | right
    seam = foreground & (np.abs(xx - 28.5) < 2)  # the band where the discs meet
    classes = np.zeros((3, 40, 60), np.float32)
    classes[0] = ~foreground
    classes[2] = foreground & seam
    classes[1] = foreground & ~seam
    split = label_boundary_plane(classes, threshold=0.5)
    assert split.max() == 2 and np.array_equal(split > 0, foreground)
    assert label_plane(1 - classes[0], 0.5).max() == 1  # the paper decoder merges them
    assert label_boundary_plane(classes, 0.5, min_size=400).max() == 0
    with pytest.raises(ValueError, match=r"classes: expected shape \(3, Y, X\)"):
        label_boundary_plane(classes[:2])
