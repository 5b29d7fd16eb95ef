"""Network outputs -> instance labels, plane by plane.

Three decoders, one per output mode (:mod:`.targets`):

- "paper" (2 classes): foreground probability above a threshold, 8-connected components;
  optionally split (``split``) at narrow necks and between pairs of deep notches: the network
  often leaves touching nuclei joined by a bridge a few pixels wide, or overlapping nuclei as
  one blob with a waist, which a threshold alone only trades against missed nuclei.
- "boundary" (3 classes): interiors above a threshold are the seeds; scikit-image's watershed
  grows them over the foreground (interior + boundary probability above 0.5), so touching
  objects that share a boundary band become separate objects.
- "distance": distance-map peaks seed a watershed over the foreground.

Every decoder can then drop faint objects (``min_peak``): those whose foreground probability
stays under a floor everywhere. The network marks a real nucleus with near-certain pixels
somewhere inside it; debris, blur and out-of-focus haze reach the threshold but not the floor.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import Any, NamedTuple

import numpy as np


def labels_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds ``max_label``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


EIGHT = np.ones((3, 3), bool)
# a core this small is what erosion leaves of a bulge on one nucleus, not a second nucleus
# (chosen with the erosion depth on the bundled model's tuning images: 1-8 px changed little)
MIN_CORE = 5
# a cut stands only if every piece is at least this fraction of the plane's median object: a
# smaller piece is a lobe of one large nucleus, not a nucleus of its own (a round prior: the
# bundled model's tuning images score 0.4-0.6 within 0.004 of each other)
SMALLEST_PIECE = 0.5
# a straight cut between two of an object's notches is made only if both reach this far into
# its convex hull, as a fraction of the radius of the plane's median object: two overlapping
# round nuclei make two deep notches at their waist; a kidney-shaped nucleus makes one, a
# ragged outline shallow ones. The plane's radius, not the object's, so that the waists along
# a chain of three nuclei count as much as a pair's (the bundled model's tuning images, mean
# AP@0.5: 0.2 / 0.3 / 0.35 / 0.4 / 0.5 scored 0.844 / 0.875 / 0.875 / 0.874 / 0.873, against
# 0.870 without these cuts)
NOTCH_DEPTH = 0.35
# cuts per component: a cluster of n overlapping nuclei needs n - 1
MAX_NOTCH_CUTS = 7


def label_plane(
    probability: np.ndarray, threshold: float = 0.5, min_size: int = 0, split: int = 0
) -> np.ndarray:
    """Instance labels of one plane: pixels with ``probability > threshold``, 8-connected
    components, split at necks narrower than about ``2 * split + 1`` px and between deep
    notches, components smaller than ``min_size`` pixels removed, ids 1..N in raster order (the
    pieces cut off a component after all components).

    Splitting (``split > 0``), in two steps:

    1. Necks: the foreground is eroded ``split`` times (4-connected); each 8-connected part of
       what remains, of at least ``MIN_CORE`` px, is a core. A component with two or more cores
       is shared among them by scikit-image's watershed of the inverted probability
       (8-connected).
    2. Notches: where two of an object's notches (the gaps between it and its convex hull)
       reach ``NOTCH_DEPTH`` times the radius of the plane's median object into the hull, a
       straight line between their deepest points cuts it in two (of several such pairs, the
       shortest cut that leaves two pieces); each piece is tried again, up to
       ``MAX_NOTCH_CUTS`` cuts per component. Objects with holes are not cut this way.

    The plane's median object is the median area of its objects of at least ``min_size`` px,
    after the neck cuts (its radius: that of a disc of that area). Neither step makes a cut that leaves a piece smaller than
    ``SMALLEST_PIECE`` times it.

    Parameters
    ----------
    probability : numpy.ndarray, shape (Y, X)
    threshold : float
    min_size : int
    split : int
        Erosion depth (px) of the neck cuts; 0: plain connected components, no cuts at all.

    Returns
    -------
    numpy.ndarray, shape (Y, X), uint32
    """
    from scipy import ndimage

    foreground = probability > threshold
    labels = np.empty(foreground.shape, np.uint32)
    count = ndimage.label(foreground, structure=EIGHT, output=labels)
    if split and count:
        labels, count = _split_necks(labels, count, foreground, probability, split, min_size)
        labels, count = _cut_at_notches(labels, count, foreground, min_size)
    return _without_small(labels, count, min_size, foreground)


def _split_necks(labels, count: int, foreground, probability, split: int, min_size: int):
    """Components of ``labels`` (uint32, ids 1..count, in place) cut where eroding them
    ``split`` times separates cores: (labels, their count). A cut component keeps its id for
    the piece that holds its first pixel; its other pieces get ids from ``count + 1`` on."""
    from scipy import ndimage

    cores, n_cores = _cores(foreground, split)
    inside = cores > 0
    pairs = np.unique(labels[inside].astype(np.int64) * (n_cores + 1) + cores[inside])
    cores_per_component = np.bincount(pairs // (n_cores + 1), minlength=count + 1)
    several = np.flatnonzero(cores_per_component >= 2)
    if not several.size:
        return labels, count
    boxes = ndimage.find_objects(labels)
    cuts = {
        int(c): _pieces(labels[boxes[c - 1]] == c, cores[boxes[c - 1]], probability[boxes[c - 1]])
        for c in several
    }
    piece_areas = {c: np.unique(p[p > 0], return_counts=True)[1] for c, p in cuts.items()}
    areas = np.bincount(labels[foreground], minlength=count + 1)[1:]
    typical = _median_area(
        np.concatenate([np.delete(areas, several - 1), *piece_areas.values()]), min_size
    )
    least = SMALLEST_PIECE * typical
    for component, pieces in cuts.items():
        if piece_areas[component].min() >= least:
            count = _relabel_pieces(labels[boxes[component - 1]], pieces, component, count)
    return labels, count


def _median_area(areas: np.ndarray, min_size: int) -> float:
    """The median of the object ``areas`` (px) of at least ``min_size``; 0.0 if there are none."""
    objects = areas[areas >= max(min_size, 1)]
    return float(np.median(objects)) if objects.size else 0.0


def _cut_at_notches(labels, count: int, foreground, min_size: int):
    """Objects of ``labels`` (uint32, ids 1..count, in place) cut between pairs of deep notches
    (:func:`label_plane`): (labels, their count). A cut object keeps its id for the piece that
    holds its first pixel; its other pieces get ids from ``count + 1`` on."""
    from scipy import ndimage

    areas = np.bincount(labels[foreground], minlength=count + 1)[1:]
    typical = _median_area(areas, min_size)
    if not typical:  # every object goes to the size filter
        return labels, count
    least = SMALLEST_PIECE * typical
    deep = NOTCH_DEPTH * np.sqrt(typical / np.pi)
    for component, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None or areas[component - 1] < 2 * least:
            continue
        region = labels[box]
        pieces = _notch_pieces(region == component, deep, least)
        if pieces.max() > 1:
            count = _relabel_pieces(region, pieces, component, count)
    return labels, count


def _notch_pieces(mask, deep: float, least: float) -> np.ndarray:
    """``mask`` (one object) cut between deep notches, again and again: piece ids 1.. on the
    mask, 0 elsewhere."""
    pieces = mask.astype(np.uint32)
    count, uncut = 1, [1]
    while uncut and count <= MAX_NOTCH_CUTS:
        piece = uncut.pop()
        half = _notch_cut(pieces == piece, deep, least)
        if half is not None:
            count += 1
            pieces[half] = count
            uncut += [piece, count]
    return pieces


def _notch_cut(mask, deep: float, least: float) -> np.ndarray | None:
    """The half of ``mask`` that a straight cut between two notches at least ``deep`` px deep
    separates, or None where fewer than two notches are that deep or every cut leaves a piece
    under ``least`` px."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    area = int(mask.sum())
    # a hole (a background part apart from the box's rim) is a dim inside the threshold left
    # out: one large nucleus, whose notches are the clefts between its lobes (the bundled
    # model's tuning images: 36 fewer false objects than with holes filled)
    if area < 2 * least or ndimage.label(~np.pad(mask, 1))[1] > 1:
        return None
    hull = convex_hull_image(mask)
    notches, n = ndimage.label(hull & ~mask)
    if n < 2:
        return None
    depth = ndimage.distance_transform_edt(np.pad(hull, 1))[1:-1, 1:-1]
    points = _deepest_points(notches, depth, deep, mask.shape)
    # the shortest cut first: along a chain of nuclei, a notch faces its partner across the
    # waist, not its neighbour on the same side
    pairs = sorted(
        (np.hypot(*np.subtract(a, b)), a, b) for i, a in enumerate(points) for b in points[i + 1 :]
    )
    for _, a, b in pairs:
        half = _halves(mask, (a, b), least)
        if half is not None:
            return half
    return None


def _deepest_points(notches, depth, deep: float, shape) -> list[tuple[int, int]]:
    """The deepest pixel (row, col) of each of the ``notches`` (labels) that reaches ``deep``
    px into the hull (``depth``)."""
    where = np.flatnonzero(notches)
    ids, depths = notches.flat[where], depth.flat[where]
    order = np.lexsort((-depths, ids))  # notch by notch, deepest first
    deepest = order[np.r_[True, ids[order][1:] != ids[order][:-1]]]
    deepest = deepest[depths[deepest] >= deep]
    rows, cols = np.unravel_index(where[deepest], shape)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def _halves(mask, ends, least: float) -> np.ndarray | None:
    """The part of ``mask`` on one side of the line between ``ends`` (two (row, col)), every
    pixel given to the nearer side; None when a side is under ``least`` px."""
    from scipy import ndimage
    from skimage.draw import line

    cut = mask.copy()
    cut[line(*ends[0], *ends[1])] = False
    # 4-connected: an 8-connected line separates the sides
    sides, n = ndimage.label(cut)
    if n < 2:
        return None
    two = np.argsort(np.bincount(sides.ravel())[1:])[-2:] + 1
    seeds = np.where(np.isin(sides, two), sides, 0)
    nearest = ndimage.distance_transform_edt(
        seeds == 0, return_distances=False, return_indices=True
    )
    half = mask & (seeds[tuple(nearest)] == two[0])
    return half if least <= half.sum() <= mask.sum() - least else None


def _relabel_pieces(region, pieces, component: int, count: int) -> int:
    """Write ``pieces`` (piece ids on one component's pixels) into ``region`` as ids: the piece
    at the component's first pixel keeps ``component``, the others take ``count + 1``, ...;
    returns the new count."""
    mask = pieces > 0
    ids = np.unique(pieces[mask])
    first = pieces.ravel()[np.argmax(mask.ravel())]
    others = ids[ids != first]
    table = np.zeros(int(ids[-1]) + 1, np.uint32)
    table[first] = component
    table[others] = np.arange(count + 1, count + 1 + others.size, dtype=np.uint32)
    region[mask] = table[pieces[mask]]
    return count + int(others.size)


def _cores(foreground, split: int) -> tuple[np.ndarray, int]:
    """8-connected parts of ``foreground`` eroded ``split`` times, those under ``MIN_CORE`` px
    dropped (ids keep their numbers)."""
    from scipy import ndimage

    cores, count = ndimage.label(
        ndimage.binary_erosion(foreground, ndimage.generate_binary_structure(2, 1), split),
        structure=EIGHT,
    )
    inside = np.flatnonzero(cores)
    ids = cores.ravel()[inside]
    small = np.bincount(ids, minlength=count + 1) < MIN_CORE
    cores.ravel()[inside[small[ids]]] = 0
    return cores, count


def _pieces(mask, cores, probability) -> np.ndarray:
    """``mask`` (one component) shared among its ``cores`` by a watershed of the inverted
    probability, so each cut follows the neck's least certain pixels: core ids on the mask, 0
    elsewhere."""
    from skimage.segmentation import watershed

    pieces = watershed(-probability, np.where(mask, cores, 0), mask=mask, connectivity=2)
    return pieces.astype(np.uint32, copy=False)


FOREGROUND_LEVEL = 0.5


def label_boundary_plane(
    classes: np.ndarray, threshold: float = 0.5, min_size: int = 0
) -> np.ndarray:
    """Instance labels of one plane of a 3-class (background / interior / boundary) output.

    Seeds are 8-connected components of ``interior > threshold``; the watershed of the inverted
    interior probability grows them over the pixels whose foreground probability
    (interior + boundary) exceeds 0.5. Objects smaller than ``min_size`` pixels are removed and
    ids are 1..N in raster order of the seeds.

    Parameters
    ----------
    classes : numpy.ndarray, shape (3, Y, X)
        Class probabilities (softmax).
    threshold : float
    min_size : int

    Returns
    -------
    numpy.ndarray, shape (Y, X), uint32
    """
    classes = _three_maps(classes, "classes")
    foreground = (1.0 - classes[0]) > FOREGROUND_LEVEL
    return _seeded_watershed(classes[1], foreground, threshold, min_size)


def label_distance_plane(maps: np.ndarray, threshold: float = 0.5, min_size: int = 0) -> np.ndarray:
    """Instance labels of one plane of a distance-mode output.

    Seeds are 8-connected components of ``distance > threshold`` (the centres of objects, where
    the scaled distance to the object's edge is high); the watershed of the inverted distance
    grows them over the pixels whose foreground probability exceeds 0.5. Objects smaller than
    ``min_size`` pixels are removed; ids are 1..N in raster order of the seeds.

    Parameters
    ----------
    maps : numpy.ndarray, shape (3, Y, X)
        Background and foreground probability, then the distance map in [0, 1].
    threshold : float
    min_size : int

    Returns
    -------
    numpy.ndarray, shape (Y, X), uint32
    """
    maps = _three_maps(maps, "maps")
    return _seeded_watershed(maps[2], maps[1] > FOREGROUND_LEVEL, threshold, min_size)


def _three_maps(maps, name: str) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != 3:
        raise ValueError(f"{name}: expected shape (3, Y, X), got {maps.shape}")
    return maps


def _seeded_watershed(height, foreground, threshold: float, min_size: int) -> np.ndarray:
    """Seeds: 8-connected components of ``height > threshold`` in the foreground; the watershed
    of ``-height`` grows them over the foreground; small objects removed."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    height = height.astype(np.float32, copy=False)
    seeds, count = ndimage.label((height > threshold) & foreground, structure=EIGHT)
    if count == 0:
        return np.zeros(height.shape, np.uint32)
    labels = watershed(-height, seeds, mask=foreground).astype(np.uint32, copy=False)
    return _without_small(labels, count, min_size, labels > 0)


DECODERS: dict[str, Callable[..., np.ndarray]] = {
    "paper": label_plane,
    "boundary": label_boundary_plane,
    "distance": label_distance_plane,
}


def decode_plane(
    maps: np.ndarray,
    threshold: float = 0.5,
    min_size: int = 0,
    mode: str | None = None,
    split: int = 0,
    min_peak: float = 0.0,
) -> np.ndarray:
    """Instance labels of one plane, by the decoder of the model's output mode, without the
    objects whose foreground probability never reaches ``min_peak``.

    Parameters
    ----------
    maps : numpy.ndarray
        Shape (Y, X): foreground probability (paper mode, :func:`label_plane`).
        Shape (3, Y, X): class probabilities (boundary mode, :func:`label_boundary_plane`) or
        background, foreground and distance (distance mode, :func:`label_distance_plane`).
    threshold : float
    min_size : int
    mode : {None, "paper", "boundary", "distance"}
        ``UNetConfig.output_mode``; None: paper for (Y, X) maps, boundary for (3, Y, X).
    split : int
        Paper mode: erosion depth that cuts necks (:func:`label_plane`). The other modes split
        objects by their own seeds and take only 0.
    min_peak : float
        Objects are kept only where their foreground probability (:func:`foreground_probability`)
        reaches this somewhere; ids are renumbered 1..N in order. 0: every object is kept.

    Returns
    -------
    numpy.ndarray, shape (Y, X), uint32
    """
    maps = np.asarray(maps)
    if mode is None:
        mode = "paper" if maps.ndim == 2 else "boundary"
    if mode not in DECODERS:
        raise ValueError(f"mode: expected one of {sorted(DECODERS)}, got {mode!r}")
    if mode == "paper":
        labels = label_plane(maps, threshold, min_size, split)
    else:
        check_split(split, mode)
        labels = DECODERS[mode](maps, threshold, min_size)
    if min_peak <= 0:
        return labels
    return without_faint(labels, object_peaks(labels, foreground_probability(maps)), min_peak)


def foreground_probability(maps: np.ndarray) -> np.ndarray:
    """The foreground probability of one plane of network maps: the map itself for a (Y, X)
    paper-mode output, 1 - background for (3, Y, X) outputs.

    Returns
    -------
    numpy.ndarray of float32, shape (Y, X)
    """
    maps = np.asarray(maps)
    if maps.ndim == 2:
        return maps.astype(np.float32, copy=False)
    return (1.0 - maps[0]).astype(np.float32)


def object_peaks(labels: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """The highest ``probability`` in each object of ``labels`` (ids 1..N): shape (N + 1,),
    index 0 (background) set to 1.0 so that it is never dropped as faint."""
    from scipy import ndimage

    count = int(labels.max())
    peaks = np.ones(count + 1, np.float32)
    if count:
        peaks[1:] = ndimage.maximum(probability, labels, np.arange(1, count + 1))
    return peaks


def without_faint(labels: np.ndarray, peaks: np.ndarray, min_peak: float) -> np.ndarray:
    """``labels`` (ids 1..N) without the objects whose peak (:func:`object_peaks`) is under
    ``min_peak``, renumbered 1..N in order (a new array when any is dropped)."""
    keep = peaks >= min_peak
    if keep.all():
        return labels
    keep[0] = False
    relabel = np.zeros(peaks.size, labels.dtype)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return relabel[labels]


def _without_small(
    labels: np.ndarray, count: int, min_size: int, foreground: np.ndarray
) -> np.ndarray:
    """Remove objects under ``min_size`` px from uint32 ``labels`` (in place) and renumber the
    rest 1..N in order; only foreground pixels are touched (a fraction of a plane)."""
    if min_size <= 1 or not count:
        return labels
    ids = labels[foreground]
    sizes = np.bincount(ids, minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    if keep[1:].all():
        return labels
    relabel = np.zeros(count + 1, np.uint32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    labels[foreground] = relabel[ids]
    return labels


def instance_labels(
    probability: np.ndarray,
    threshold: float = 0.5,
    min_size: int = 0,
    split: int = 0,
    min_peak: float = 0.0,
) -> np.ndarray:
    """Label every (Y, X) plane of ``probability`` separately (ids restart at 1 in each plane).

    Parameters
    ----------
    probability : numpy.ndarray, shape (..., Y, X)
    threshold, min_size, split, min_peak
        As for :func:`decode_plane` (paper mode).

    Returns
    -------
    numpy.ndarray, shape (..., Y, X), the smallest unsigned dtype that holds the largest id
    """
    check_postprocess_options(threshold, min_size, split, min_peak)
    flat = np.asarray(probability).reshape((-1,) + probability.shape[-2:])
    planes = [decode_plane(p, threshold, min_size, "paper", split, min_peak) for p in flat]
    largest = max((int(p.max()) for p in planes), default=0)
    return np.stack(planes).reshape(probability.shape).astype(labels_dtype(largest))


class PostprocessOptions(NamedTuple):
    """How network maps become objects (:func:`decode_plane`)."""

    threshold: float = 0.5
    min_size: int = 0
    split: int = 0
    min_peak: float = 0.0


def postprocess_options(
    metadata: dict | None, threshold=None, min_size=None, split=None, min_peak=None
) -> PostprocessOptions:
    """Threshold, minimum size, neck-splitting depth and object confidence floor: the given
    values, else the model's recommendation (``metadata["postprocess"]``, chosen when the model
    was made), else the defaults of :class:`PostprocessOptions` (0.5, 0, 0 and 0.0)."""
    recommended = (metadata or {}).get("postprocess") or {}
    given = {"threshold": threshold, "min_size": min_size, "split": split, "min_peak": min_peak}
    chosen: dict[str, Any] = {
        name: recommended.get(name, PostprocessOptions._field_defaults[name])
        if value is None
        else value
        for name, value in given.items()
    }
    options = PostprocessOptions(**chosen)
    check_postprocess_options(*options)
    return options


def check_split(split, mode: str = "paper") -> None:
    """Raise ValueError unless ``split`` is a non-negative integer, and 0 outside paper mode."""
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or split < 0:
        raise ValueError(f"split: expected a non-negative integer (px), got {split!r}")
    if split and mode != "paper":
        raise ValueError(
            f"split: expected 0 for a {mode}-mode model, which splits objects from its own "
            f"seeds, got {split}"
        )


def check_postprocess_options(threshold, min_size, split=0, min_peak=0.0) -> None:
    """Raise ValueError unless 0 <= threshold < 1, min_size and split are non-negative
    integers and 0 <= min_peak <= 1."""
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 <= threshold < 1
    ):
        raise ValueError(f"threshold: expected a number in [0, 1), got {threshold!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size: expected a non-negative integer, got {min_size!r}")
    check_split(split)
    if (
        isinstance(min_peak, bool)
        or not isinstance(min_peak, (int, float))
        or not 0 <= min_peak <= 1
    ):
        raise ValueError(f"min_peak: expected a number in [0, 1], got {min_peak!r}")


THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SIZES = (0, 5, 10, 15, 25, 40, 60, 90)
SPLITS = (0, 1, 2, 3)
# finer toward 1, where the probabilities of a network's confident objects crowd
MIN_PEAKS = (0.0, 0.6, 0.7, 0.8, 0.9, 0.925, 0.95, 0.975)


def choose_postprocess(
    probabilities,
    truths,
    thresholds=THRESHOLDS,
    min_sizes=MIN_SIZES,
    mode: str | None = None,
    splits=SPLITS,
    min_peaks=MIN_PEAKS,
) -> dict:
    """The threshold, minimum object size, neck-splitting depth and object confidence floor
    with the best mean AP@0.5 over annotated planes.

    Parameters
    ----------
    probabilities : sequence of numpy.ndarray, each shape (Y, X) or (3, Y, X)
        Foreground probability (paper mode) or class probabilities (boundary mode) of each
        plane (see :func:`decode_plane`).
    truths : sequence of numpy.ndarray, each shape (Y, X)
        Instance labels of each plane (0 = background).
    thresholds, min_sizes, splits, min_peaks : sequences
        The grid searched; ``splits`` only in paper mode (the others take 0).
    mode : str, optional
        The model's output mode (:func:`decode_plane`).

    Returns
    -------
    dict
        ``threshold``, ``min_size``, ``split``, ``min_peak``, ``ap50`` (mean over planes),
        ``planes``; ties go to the smaller threshold, then the smaller size, split and floor.
    """
    paper = mode == "paper" or (mode is None and all(np.ndim(p) == 2 for p in probabilities))
    if not paper:
        splits = (0,)
    foregrounds = [foreground_probability(p) for p in probabilities]
    scores = {}
    for threshold, split in product(thresholds, splits):
        for min_size, min_peak in product(min_sizes, min_peaks):
            check_postprocess_options(threshold, min_size, split, min_peak)
        for min_size, decoded in _decoded_by_size(probabilities, threshold, min_sizes, mode, split):
            for min_peak, score in _scores_by_floor(decoded, foregrounds, truths, min_peaks):
                scores[threshold, min_size, split, min_peak] = score
    if not scores:
        raise ValueError("thresholds, min_sizes, splits, min_peaks: expected non-empty grids")
    best = min(scores, key=lambda options: (-scores[options], *options))
    return {
        **PostprocessOptions(*best)._asdict(),
        "ap50": scores[best],
        "planes": len(truths),
    }


def _scores_by_floor(decoded, foregrounds, truths, min_peaks):
    """(min_peak, mean AP@0.5 of ``decoded`` without the objects under it) for each floor; each
    plane's overlaps with its truth are counted once for all floors."""
    from .metrics import match_subsets

    per_plane = []
    for labels, probability, truth in zip(decoded, foregrounds, truths):
        peaks = object_peaks(labels, probability)
        per_plane.append(match_subsets(labels, truth, [peaks >= f for f in min_peaks], 0.5))
    for index, min_peak in enumerate(min_peaks):
        yield min_peak, float(np.mean([scores[index].ap for scores in per_plane]))


def _decoded_by_size(probabilities, threshold: float, min_sizes, mode, split: int):
    """(min_size, the decoded planes) for each of ``min_sizes``. The size filter comes last in
    every decoder, so without a split one decoding serves every size; a split's guards measure
    the plane's objects of at least ``min_size``, so with one, each size is decoded."""
    if split:
        for min_size in min_sizes:
            yield (
                min_size,
                [decode_plane(p, threshold, min_size, mode, split) for p in probabilities],
            )
        return
    decoded = [decode_plane(p, threshold, 0, mode, 0) for p in probabilities]
    for min_size in min_sizes:
        yield min_size, [_without_small_copy(labels, min_size) for labels in decoded]


def _without_small_copy(labels: np.ndarray, min_size: int) -> np.ndarray:
    """A copy of decoded ``labels`` (ids 1..N) without objects under ``min_size`` px."""
    return _without_small(labels.copy(), int(labels.max()), min_size, labels > 0)


class ZLinker:
    """Link 2D objects across consecutive planes of a Z stack into 3D ids (like cellpose's
    ``stitch_threshold``): an object takes the id of the object in the plane before it that it
    overlaps with the highest IoU, at least ``min_iou``, one to one (best pairs first);
    others get new ids. Planes are fed in order; memory holds the previous plane.

    Parameters
    ----------
    min_iou : float
        In (0, 1].
    """

    def __init__(self, min_iou: float):
        if (
            isinstance(min_iou, bool)
            or not isinstance(min_iou, (int, float))
            or not 0 < min_iou <= 1
        ):
            raise ValueError(f"link_z: expected an IoU in (0, 1], got {min_iou!r}")
        self.min_iou = float(min_iou)
        self.previous: np.ndarray | None = None
        self.next_id = 1

    def link(self, labels: np.ndarray, new_stack: bool = False) -> np.ndarray:
        """Ids of ``labels`` (one plane, ids 1..N) made consistent with the previous plane's;
        ``new_stack`` starts a new Z series (no link to the plane before).

        Returns
        -------
        numpy.ndarray of uint64, shape (Y, X)
        """
        count = int(labels.max())
        mapping = np.zeros(count + 1, np.uint64)
        if self.previous is not None and not new_stack and count:
            for current, previous in self._matches(labels):
                mapping[current] = previous
        unmatched = np.flatnonzero(mapping[1:] == 0) + 1
        mapping[unmatched] = np.arange(self.next_id, self.next_id + len(unmatched), dtype=np.uint64)
        self.next_id += len(unmatched)
        linked = mapping[labels]
        self.previous = linked
        return linked

    def _matches(self, labels):
        both = (labels > 0) & (self.previous > 0)
        pairs, overlap = np.unique(
            np.stack([labels[both].astype(np.uint64), self.previous[both]]),
            axis=1,
            return_counts=True,
        )
        current_ids, current_area = np.unique(labels[labels > 0], return_counts=True)
        previous_ids, previous_area = np.unique(
            self.previous[self.previous > 0], return_counts=True
        )
        union = (
            current_area[np.searchsorted(current_ids, pairs[0])]
            + previous_area[np.searchsorted(previous_ids, pairs[1])]
            - overlap
        )
        iou = overlap / union
        used_current, used_previous = set(), set()
        for index in np.argsort(-iou, kind="stable"):
            if iou[index] < self.min_iou:
                break
            current, previous = int(pairs[0, index]), int(pairs[1, index])
            if current not in used_current and previous not in used_previous:
                used_current.add(current)
                used_previous.add(previous)
                yield current, previous
