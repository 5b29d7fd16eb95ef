import numpy as np
import pytest
from scipy import ndimage

from napari_tiled_unet.core.metrics import touching_pairs
from napari_tiled_unet.core.weights import CUTOFF, border_weight_map, separate_touching


def touching_discs(rng, shape=(96, 96), count=18, radius=(5, 10)):
    """Random discs painted in id order, so later discs overlap (touch) earlier ones."""
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for index in range(1, count + 1):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(*radius)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = index
    # Drop ids fully painted over so the count is well defined.
    return np.searchsorted(np.unique(labels), labels).astype(np.int32)


def brute_force_term(labels, w0, sigma, sampling=(1.0, 1.0)):
    ids = [i for i in np.unique(labels) if i]
    distances = np.stack(
        [ndimage.distance_transform_edt(labels != i, sampling=sampling) for i in ids]
    )
    distances.sort(axis=0)
    d1, d2 = distances[0], distances[1] if len(ids) > 1 else np.full(labels.shape, np.inf)
    return w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), d1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaps_keep_every_object_and_leave_no_touching_pair(seed):
    labels = touching_discs(np.random.default_rng(seed))
    assert touching_pairs(labels)  # the fixture really has touching objects
    separated = separate_touching(labels)
    assert touching_pairs(separated) == set()
    assert set(np.unique(separated)) == set(np.unique(labels))
    assert ((separated == labels) | (separated == 0)).all()  # only pixels removed


@pytest.mark.parametrize(
    "seed, w0, sigma, pixel_size",
    [
        (0, 10.0, 5.0, None),
        (1, 10.0, 5.0, None),
        (2, 50.0, 6.0, None),
        (3, 10.0, 0.8, 0.2),
    ],
)
def test_weight_map_equals_brute_force_where_the_term_matters(seed, w0, sigma, pixel_size):
    labels = separate_touching(touching_discs(np.random.default_rng(seed)))
    sampling = (1.0, 1.0) if pixel_size is None else (pixel_size, pixel_size)
    weights = border_weight_map(labels, w0, sigma, class_balance=False, pixel_size=pixel_size)
    reference, _ = brute_force_term(labels, w0, sigma, sampling)
    background = labels == 0
    matters = background & (reference > CUTOFF)
    assert matters.sum() > 200
    assert np.abs(weights[matters] - (1 + reference[matters])).max() <= 1e-4
    assert np.abs(weights[background] - (1 + reference[background])).max() <= CUTOFF
    assert (weights[~background] == 1).all()


def test_class_balance_and_fiji_variant():
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1  # 100 foreground pixels of 1600
    paper = border_weight_map(labels)
    assert paper[10, 10] == pytest.approx(1600 / 200)
    assert paper[39, 39] == pytest.approx(1600 / 3000)  # far from the only object: no term
    # a painted region: class frequencies count annotated pixels only (100 fg of 400)
    region = np.zeros_like(labels, bool)
    region[0:20, 0:20] = True
    painted = border_weight_map(labels, annotated=region)
    assert painted[10, 10] == pytest.approx(400 / 200)
    assert painted[19, 0] == pytest.approx(400 / 600)
    stack = border_weight_map(np.stack([labels, labels]), annotated=np.stack([region, ~region]))
    np.testing.assert_array_equal(stack[0], painted)
    assert stack[1][10, 10] == 1  # no annotated foreground: that class keeps weight 1
    fiji = border_weight_map(labels, w0=50, sigma=6, variant="fiji")
    d1 = np.hypot(39 - 14, 39 - 14)
    assert fiji[10, 10] == 1
    assert fiji[39, 39] == pytest.approx(0.1 + 0.9 * np.exp(-(d1**2) / 200), rel=1e-5)


def test_stacks_are_weighted_plane_by_plane():
    rng = np.random.default_rng(5)
    stack = np.stack([separate_touching(touching_discs(rng, (48, 48), 6)) for _ in range(3)])
    weights = border_weight_map(stack)
    assert weights.shape == stack.shape and weights.dtype == np.float32
    for plane, result in zip(stack, weights):
        assert np.array_equal(result, border_weight_map(plane))


@pytest.mark.parametrize(
    "labels, options, match",
    [
        (np.zeros((4, 4), np.float32), {}, "labels: expected integer"),
        (-np.ones((4, 4), np.int32), {}, "labels: expected non-negative"),
        (np.zeros(4, np.int32), {}, "labels: expected at least 2 axes"),
        (np.zeros((4, 4), np.int32), {"sigma": 0}, "sigma"),
        (np.zeros((4, 4), np.int32), {"w0": -1}, "w0"),
        (np.zeros((4, 4), np.int32), {"variant": "unet"}, "variant"),
        (np.zeros((4, 4), np.int32), {"pixel_size": -1.0}, "pixel_size"),
        (np.zeros((4, 4), np.int32), {"annotated": np.ones((4, 5), bool)}, "annotated"),
    ],
)
def test_bad_options_are_rejected(labels, options, match):
    with pytest.raises(ValueError, match=match):
        border_weight_map(labels, **options)
