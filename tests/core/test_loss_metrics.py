import numpy as np
import pytest
import torch
from torch.nn import functional as F

from napari_tiled_unet.core.loss import weighted_cross_entropy
from napari_tiled_unet.core.metrics import diameter_range, match_objects, pixel_iou


def test_unit_weights_equal_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 9, 11)
    target = torch.randint(0, 3, (2, 9, 11))
    loss = weighted_cross_entropy(logits, target, torch.ones(2, 9, 11))
    assert torch.allclose(loss, F.cross_entropy(logits, target), atol=1e-6)


def test_ignored_pixels_contribute_nothing_to_loss_or_gradient():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 6, 6, requires_grad=True)
    target = torch.randint(0, 2, (1, 6, 6))
    target[0, :3] = 99  # garbage class where ignored
    weights = torch.ones(1, 6, 6)
    weights[0, :3] = 0
    weights[0, 4, 4] = 3.0
    loss = weighted_cross_entropy(logits, target, weights)
    per_pixel = F.cross_entropy(logits[..., 3:, :], target[:, 3:], reduction="none")
    expected = (per_pixel * weights[:, 3:]).sum() / 18
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert (logits.grad[..., :3, :] == 0).all() and (logits.grad[..., 3:, :] != 0).any()


def test_loss_with_everything_ignored_is_zero():
    logits = torch.randn(1, 2, 4, 4)
    assert (
        weighted_cross_entropy(
            logits, torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4)
        ).item()
        == 0
    )


def test_object_matching_counts_tp_fp_fn():
    truth = np.zeros((10, 20), np.uint16)
    truth[1:5, 1:5] = 1  # matched (IoU 16/20)
    truth[1:5, 10:14] = 2  # missed
    predicted = np.zeros_like(truth)
    predicted[1:5, 1:6] = 7
    predicted[7:9, 15:19] = 3  # spurious
    scores = match_objects(predicted, truth)
    assert (scores.tp, scores.fp, scores.fn) == (1, 1, 1)
    assert scores.ap == pytest.approx(1 / 3) and scores.f1 == pytest.approx(0.5)
    assert match_objects(predicted, truth, threshold=0.85).tp == 0
    assert pixel_iou(predicted, truth) == pytest.approx(16 / (20 + 16 + 8))


def test_touching_pairs_and_how_many_a_prediction_splits():
    from napari_tiled_unet.core.metrics import split_touching_pairs, touching_pairs

    truth = np.zeros((6, 12), np.int32)
    truth[1:4, 1:4], truth[1:4, 4:7] = 1, 2  # side by side
    truth[4, 7] = 3  # diagonal neighbour of 2
    truth[1:3, 9:11] = 4  # alone
    assert touching_pairs(truth) == {(1, 2), (2, 3)}
    merged = np.where(truth > 0, 1, 0)
    assert split_touching_pairs(merged, truth) == (0, 2)
    assert split_touching_pairs(truth * 10, truth) == (2, 2)
    missed = np.where(truth == 3, 0, truth)
    assert split_touching_pairs(missed, truth) == (1, 2)


def test_matching_many_objects_uses_sparse_overlaps():
    """12,000 objects a side: a dense IoU matrix would take 1.1 GB."""
    import tracemalloc

    from napari_tiled_unet.core.metrics import match_objects

    truth = np.zeros((1200, 1000), np.int32)
    ids = np.arange(1, 12001).reshape(120, 100)
    truth[:] = np.kron(ids, np.ones((10, 10), np.int32))  # 12,000 squares of 100 px
    predicted = np.roll(truth, 2, axis=1)  # shifted: IoU 80/120 per pair
    predicted[:, :2] = 0
    tracemalloc.start()
    scores = match_objects(predicted, truth, 0.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (scores.tp, scores.fp, scores.fn) == (12000, 0, 0)
    assert peak < 200e6
    assert match_objects(predicted, truth, 0.7).tp == 120  # only the edge column: 80 / 100


def test_matching_subsets_equals_matching_the_labels_without_the_dropped_objects(rng):
    from napari_tiled_unet.core.metrics import match_subsets

    truth = np.zeros((40, 40), np.uint16)
    truth[2:6, 2:10] = 1  # cut exactly in half by predictions 1 and 2: IoU 0.5 each
    truth[20:30, 20:30] = 2
    predicted = np.zeros_like(truth)
    predicted[2:6, 2:6], predicted[2:6, 6:10] = 1, 2
    predicted[21:30, 20:30] = 4  # id 3 unused: ids need not be consecutive
    predicted[35:38, 35:38] = 5
    subsets = [None, *(rng.random(6) < 0.5 for _ in range(20)), np.array([0, 0, 1, 1, 1, 1], bool)]
    for keep, scores in zip(subsets, match_subsets(predicted, truth, subsets)):
        kept = predicted if keep is None else np.where(keep[predicted], predicted, 0)
        assert scores == match_objects(kept, truth, 0.5)
    # the first half goes to the first prediction; without it, the second takes the truth
    (everything,) = match_subsets(predicted, truth, [None])
    assert (everything.tp, everything.fp, everything.fn) == (2, 2, 0)
    (second,) = match_subsets(predicted, truth, [np.array([0, 0, 1, 0, 1, 0], bool)])
    assert (second.tp, second.fp, second.fn) == (2, 0, 0)


def test_the_size_range_is_taken_over_plane_medians_and_zooms():
    def squares(side, count):
        labels = np.zeros((200, 200), np.int32)
        for i in range(count):
            labels[i * 40 : i * 40 + side, :side] = i + 1
        return labels

    # plane medians: squares of 10, 20 and 30 px have equivalent diameters 11.28, 22.57, 33.85
    planes = [squares(10, 3), squares(20, 1), np.zeros((50, 50), np.int32), squares(30, 2)]
    low, high = diameter_range(planes, percentiles=(0, 100))
    assert (low, high) == (11.28, 33.85)
    assert diameter_range(planes, zoom=(0.5, 2.0), percentiles=(0, 100)) == (5.64, 67.7)
    assert diameter_range(planes) == pytest.approx((13.54, 31.59), abs=0.01)  # 10th, 90th
    assert diameter_range([np.zeros((9, 9), np.int32)]) == (0.0, 0.0)
