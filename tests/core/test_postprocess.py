import numpy as np
import pytest

from napari_tiled_unet.core.postprocess import instance_labels, label_plane, labels_dtype

from ..synthetic import discs, two_discs_and_a_neck


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
    "options, match",
    [
        ({"threshold": 1.0}, "threshold"),
        ({"min_size": -1}, "min_size"),
        ({"split": 1.5}, "split: expected a non-negative integer"),
        ({"split": -1}, "split: expected a non-negative integer"),
        ({"min_peak": 1.5}, r"min_peak: expected a number in \[0, 1\], got 1.5"),
        ({"min_peak": -0.1}, r"min_peak: expected a number in \[0, 1\], got -0.1"),
        ({"min_peak": True}, "min_peak: expected a number"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        instance_labels(np.zeros((3, 3)), **options)


def test_options_come_from_the_caller_then_the_model_then_the_defaults():
    from napari_tiled_unet.core.postprocess import postprocess_options

    recommended = {"postprocess": {"threshold": 0.7, "min_size": 25, "split": 2, "min_peak": 0.9}}
    assert postprocess_options(recommended) == (0.7, 25, 2, 0.9)
    assert postprocess_options(recommended).min_peak == 0.9
    assert postprocess_options(recommended, 0.4, None) == (0.4, 25, 2, 0.9)
    assert postprocess_options(recommended, None, 0, 0, 0.0) == (0.7, 0, 0, 0.0)
    # models tuned before the floor existed keep every object
    assert postprocess_options({"postprocess": {"threshold": 0.7}}) == (0.7, 0, 0, 0.0)
    assert postprocess_options({}) == (0.5, 0, 0, 0.0)
    assert postprocess_options(None, None, 3, 1, 0.95) == (0.5, 3, 1, 0.95)
    with pytest.raises(ValueError, match="threshold: expected a number in"):
        postprocess_options(recommended, 1.5)


def test_split_cuts_a_narrow_neck_and_keeps_every_pixel():
    probability = two_discs_and_a_neck(width=3)
    probability[6, 14] = 0.9  # a spur joined to the top of the left disc by a corner only
    assert probability[7, 15] == 0.9 and probability[7, 14] == probability[6, 15] == 0.1
    assert label_plane(probability, 0.5, 0, split=0).max() == 1
    labels = label_plane(probability, 0.5, 0, split=2)
    assert labels.max() == 2 and labels[6, 14] == 1
    np.testing.assert_array_equal(labels > 0, probability > 0.5)
    assert labels[15, 15] == 1 and labels[15, 34] == 2  # ids in raster order
    # the cut is the mirror line, in the middle of the neck
    assert set(np.unique(labels[:, :25])) == {0, 1} and set(np.unique(labels[:, 25:])) == {0, 2}


def test_split_leaves_wide_necks_lone_objects_and_thin_lines_whole():
    assert label_plane(two_discs_and_a_neck(width=9), 0.5, 0, split=2).max() == 1
    probability = np.full((30, 50), 0.1, np.float32)
    probability[5:15, 5:15] = 0.9  # one square: one core
    probability[20, 5:45] = 0.9  # a 1 px line: no core, stays one object
    probability[25:27, 5:8] = 0.9  # 6 px: no core either
    labels = label_plane(probability, 0.5, 0, split=2)
    assert labels.max() == 3
    assert labels[10, 10] == 1 and (labels[20, 5:45] == 2).all() and (labels[25:27, 5:8] == 3).all()
    assert labels.dtype == np.uint32


def test_split_leaves_a_small_lobe_on_its_nucleus(monkeypatch):
    from napari_tiled_unet.core import postprocess

    rows, cols = np.mgrid[:60, :120]
    probability = np.full((60, 120), 0.1, np.float32)
    probability[:30, :50] = two_discs_and_a_neck(width=3)  # a touching pair: cut
    nucleus = (rows - 45) ** 2 + (cols - 70) ** 2 <= 100  # radius 10
    lobe = (rows - 45) ** 2 + (cols - 85) ** 2 <= 16  # radius 4: a quarter of a nucleus
    neck = (rows == 45) & (cols >= 70) & (cols <= 85)
    probability[nucleus | lobe | neck] = 0.9
    labels = label_plane(probability, 0.5, 0, split=2)
    # components in raster order, then the pieces cut off them
    assert (labels[15, 15], labels[45, 70], labels[45, 85], labels[15, 34]) == (1, 2, 2, 3)
    monkeypatch.setattr(postprocess, "SMALLEST_PIECE", 0.0)  # without the guard it is cut
    assert label_plane(probability, 0.5, 0, split=2).max() == 4


# three lone discs of radius 10 px set the plane's median object (317 px)
LONE = [(20, 100 + 30 * i, 10) for i in range(3)]


def test_split_cuts_overlapping_discs_at_their_waist_and_keeps_every_pixel():
    # radius 10, 16 px apart: a 12 px waist, too wide for the neck cut, with two 4 px notches
    probability = discs((40, 200), (20, 20, 10), (20, 36, 10), *LONE)
    assert label_plane(probability, 0.5, 0, split=0).max() == 4
    labels = label_plane(probability, 0.5, 0, split=2)
    assert labels.max() == 5
    np.testing.assert_array_equal(labels > 0, probability > 0.5)
    # the cut runs down column 28, the mirror line: two equal halves, and the line's 13 px go to
    # one of them (the left disc, which keeps id 1)
    assert set(np.unique(labels[:, :29])) == {0, 1} and set(np.unique(labels[:, 29:50])) == {0, 5}
    assert [int((labels == i).sum()) for i in (1, 5)] == [294 + 13, 294]


def test_split_cuts_a_chain_of_three_discs_at_both_waists():
    probability = discs((40, 200), (20, 20, 10), (20, 36, 10), (20, 52, 10), *LONE)
    labels = label_plane(probability, 0.5, 0, split=2)
    assert labels.max() == 6
    pieces = [set(np.unique(labels[:, a:b])) - {0} for a, b in ((0, 28), (29, 44), (45, 70))]
    assert len(set.union(*pieces)) == 3 and all(len(p) == 1 for p in pieces)


@pytest.mark.parametrize("shape", ["kidney", "ellipse", "pair with a hole"])
def test_split_leaves_one_notch_shallow_notches_and_holed_objects_whole(shape):
    rows, cols = np.mgrid[:40, :200]
    if shape == "kidney":  # a disc with a bite out of one side: one deep notch
        probability = discs((40, 200), (20, 20, 12), *LONE)
        probability[(rows - 20) ** 2 + (cols - 6) ** 2 <= 36] = 0.1
    elif shape == "ellipse":
        probability = discs((40, 200), *LONE)
        probability[((rows - 20) / 9) ** 2 + ((cols - 30) / 22) ** 2 <= 1] = 0.9
    else:  # the overlapping pair above, with a dim 3 x 3 px inside
        probability = discs((40, 200), (20, 20, 10), (20, 36, 10), *LONE)
        probability[19:22, 27:30] = 0.1
    assert label_plane(probability, 0.5, 0, split=2).max() == 4


def test_split_leaves_a_small_overlapping_disc_on_its_neighbour(monkeypatch):
    from napari_tiled_unet.core import postprocess

    probability = discs((40, 200), (20, 20, 10), (20, 35, 7), *LONE)
    # cut off, the small disc would be 141 px, under half the median (317 px)
    assert label_plane(probability, 0.5, 0, split=2).max() == 4
    monkeypatch.setattr(postprocess, "SMALLEST_PIECE", 0.0)
    labels = label_plane(probability, 0.5, 0, split=2)
    assert np.bincount(labels.ravel())[1:].tolist() == [316, 317, 317, 317, 141]


def test_split_drops_small_objects_after_the_cut():
    probability = two_discs_and_a_neck(width=3)
    speck = probability.copy()
    speck[2:4, 45:48] = 0.9  # 6 px, apart from the discs and under min_size
    np.testing.assert_array_equal(
        label_plane(speck, 0.5, 25, split=2), label_plane(probability, 0.5, 0, split=2)
    )


def test_split_is_for_the_two_class_decoder_only():
    from napari_tiled_unet.core.postprocess import decode_plane

    classes = np.zeros((3, 20, 20), np.float32)
    classes[0] = 1.0
    assert decode_plane(classes, 0.5, 0, "boundary", split=0).max() == 0
    with pytest.raises(ValueError, match="split: expected 0 for a boundary-mode model"):
        decode_plane(classes, 0.5, 0, "boundary", split=2)


def test_tuning_chooses_a_split_where_necks_join_objects():
    from napari_tiled_unet.core.postprocess import choose_postprocess

    probability = two_discs_and_a_neck(width=3)
    rows, cols = np.mgrid[:30, :50]
    truth = np.where((probability > 0.5) & (cols < 25), 1, 0) + np.where(
        (probability > 0.5) & (cols >= 25), 2, 0
    )
    chosen = choose_postprocess([probability], [truth], thresholds=(0.5,), min_sizes=(0,))
    # eroding a 3 px neck once leaves a 1 px bridge; twice cuts it
    assert chosen == {
        "threshold": 0.5,
        "min_size": 0,
        "split": 2,
        "min_peak": 0.0,
        "ap50": 1.0,
        "planes": 1,
    }
    unsplit = choose_postprocess([probability], [truth], (0.5,), (0,), splits=(0,))
    # merged, the pair matches one true half (IoU exactly 0.5) and misses the other
    assert unsplit["split"] == 0 and unsplit["ap50"] == 0.5


def test_tuning_scores_each_size_as_the_split_sees_it():
    from napari_tiled_unet.core.postprocess import choose_postprocess, decode_plane

    probability = discs((40, 200), (20, 20, 10), (20, 36, 10), *LONE)
    truth = label_plane(probability, 0.5, 0, split=2)  # the pair cut, as above
    for i in range(8):
        probability[2:4, 5 + 6 * i : 7 + 6 * i] = 0.9  # 4 px specks, not in the truth
    # the specks make the plane's median object 4 px: with them the outlines' pixel steps count
    # as deep notches, and each of the four objects is cut the most times allowed
    assert decode_plane(probability, 0.5, 0, "paper", 2).max() == 8 + 4 * 8
    chosen = choose_postprocess([probability], [truth], (0.5,), (0, 10), splits=(0, 2))
    # without them (min_size 10) it is: the split's median counts only the objects kept
    assert chosen == {
        "threshold": 0.5,
        "min_size": 10,
        "split": 2,
        "min_peak": 0.0,
        "ap50": 1.0,
        "planes": 1,
    }


def faint_and_bright() -> np.ndarray:
    """Four discs in raster order: peaks 0.7 (faint), 0.9, 0.8 (faint), 0.9, over 0.1."""
    probability = discs((30, 130), *[(15, 15 + 30 * i, 8) for i in range(4)])
    probability[:, :30] = np.minimum(probability[:, :30], 0.7)
    probability[:, 60:90] = np.minimum(probability[:, 60:90], 0.8)
    return probability


@pytest.mark.parametrize("min_peak, kept", [(0.0, 4), (0.7, 4), (0.75, 3), (0.8, 3), (0.85, 2)])
def test_a_floor_drops_the_objects_that_never_reach_it(min_peak, kept):
    from napari_tiled_unet.core.postprocess import decode_plane

    probability = faint_and_bright()
    labels = decode_plane(probability, 0.5, 0, "paper", 0, min_peak)
    assert labels.max() == kept
    assert np.unique(labels).tolist() == list(range(kept + 1))  # renumbered 1..N in order
    everything = decode_plane(probability, 0.5, 0, "paper", 0)
    survivors = np.unique(everything[labels > 0])
    # whole objects are kept or dropped, pixel for pixel
    np.testing.assert_array_equal(labels > 0, np.isin(everything, survivors))
    assert all(probability[everything == i].max() >= min_peak for i in survivors)


def test_the_floor_reads_the_foreground_of_three_class_outputs():
    from napari_tiled_unet.core.postprocess import decode_plane

    foreground = faint_and_bright()
    interior = np.where(foreground > 0.5, 0.9, 0.0).astype(np.float32)
    classes = np.stack([1 - foreground, interior, foreground - interior.clip(max=foreground)])
    distance = np.stack([1 - foreground, foreground, interior])
    for maps, mode in ((classes, "boundary"), (distance, "distance")):
        assert decode_plane(maps, 0.5, 0, mode).max() == 4
        kept = decode_plane(maps, 0.5, 0, mode, 0, 0.85)
        np.testing.assert_array_equal(kept, decode_plane(foreground, 0.5, 0, "paper", 0, 0.85))


def test_tuning_chooses_the_floor_that_drops_false_faint_objects():
    from napari_tiled_unet.core.postprocess import choose_postprocess, decode_plane

    probability = faint_and_bright()
    truth = decode_plane(probability, 0.5, 0, "paper", 0, 0.85)  # the faint two are not nuclei
    chosen = choose_postprocess([probability], [truth], (0.5,), (0,), splits=(0,))
    # 0.8 still keeps the 0.8 disc; the next floor in the grid (0.9) drops both faint ones
    assert (chosen["min_peak"], chosen["ap50"]) == (0.9, 1.0)
    everyone = choose_postprocess([probability], [decode_plane(probability)], (0.5,), (0,))
    assert (everyone["min_peak"], everyone["ap50"]) == (0.0, 1.0)  # ties go to no floor
    floors = choose_postprocess(
        [probability], [truth], (0.5,), (0,), splits=(0,), min_peaks=(0.0, 0.75)
    )
    assert (floors["min_peak"], floors["ap50"]) == (0.75, 2 / 3)  # 2 TP, 1 FP, 0 FN


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
