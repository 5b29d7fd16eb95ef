import numpy as np
import pytest
import torch

from napari_tiled_unet.core.postprocess import label_boundary_plane, label_plane
from napari_tiled_unet.core.targets import class_target, n_classes_of, output_mode


def test_boundary_classes_mark_the_rim_and_the_seam_between_touching_objects():
    ids = np.zeros((7, 9), np.int64)
    ids[1:6, 1:4] = 1
    ids[1:6, 4:8] = 2            # touches object 1 along a column
    target = class_target(torch.from_numpy(ids)[None], 3)[0].numpy()
    expected = np.zeros((7, 9), np.int64)
    expected[1:6, 1:8] = 2       # every object pixel next to another id...
    expected[2:5, 2] = 1         # ...but the interiors
    expected[2:5, 5:7] = 1
    assert np.array_equal(target, expected)
    assert np.array_equal(class_target(torch.from_numpy(ids)[None], 2)[0].numpy(), (ids > 0) * 1)


def test_patch_edges_are_not_boundaries():
    ids = torch.ones(1, 4, 4, dtype=torch.int64)   # an object that continues past the patch
    assert (class_target(ids, 3) == 1).all()


def test_modes_and_class_counts():
    assert output_mode(2) == "paper" and output_mode(3) == "boundary"
    assert n_classes_of("boundary") == 3 and n_classes_of("paper") == 2
    with pytest.raises(ValueError, match="n_classes: expected 2 .paper. or 3 .boundary., got 4"):
        output_mode(4)
    with pytest.raises(ValueError, match="mode: expected one of"):
        n_classes_of("distance")


def test_watershed_splits_a_touching_pair_that_a_threshold_merges():
    yy, xx = np.mgrid[:40, :60]
    left, right = np.hypot(yy - 20, xx - 20) < 10, np.hypot(yy - 20, xx - 37) < 10
    foreground = left | right
    seam = foreground & (np.abs(xx - 28.5) < 2)     # the band where the discs meet
    classes = np.zeros((3, 40, 60), np.float32)
    classes[0] = ~foreground
    classes[2] = foreground & seam
    classes[1] = foreground & ~seam
    split = label_boundary_plane(classes, threshold=0.5)
    assert split.max() == 2 and np.array_equal(split > 0, foreground)
    assert label_plane(1 - classes[0], 0.5).max() == 1       # the paper decoder merges them
    assert label_boundary_plane(classes, 0.5, min_size=400).max() == 0
    with pytest.raises(ValueError, match=r"classes: expected shape \(3, Y, X\)"):
        label_boundary_plane(classes[:2])
