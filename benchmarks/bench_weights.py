"""Border weight map: ours (per-object distances near each object) vs the common recipe.

The common recipe computes one full-image distance transform per label, stacks them and sorts
along the stack to get d1 and d2. Prints time, peak memory (tracemalloc: numpy buffers) and the
largest difference, on 1024 x 1024 with ~300 touching cells, then our time on 2048 x 2048 with
~1200 cells.

    python benchmarks/bench_weights.py
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
from scipy import ndimage

from napari_tiled_unet.core.weights import border_weight_map, separate_touching


def touching_cells(size: int, count: int, seed: int = 0) -> np.ndarray:
    """Voronoi-like cells: seeds grown into each other, then cut to ~cell size, so most touch."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    points = rng.integers(0, size, (count, 2))
    seeds[points[:, 0], points[:, 1]] = np.arange(1, count + 1)
    distance, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    cell_radius = size / np.sqrt(count) * 0.6
    labels = np.where(distance <= cell_radius, seeds[iy, ix], 0)
    return separate_touching(labels)


def common_recipe(labels, w0=10.0, sigma=5.0):
    ids = [i for i in np.unique(labels) if i]
    distances = np.stack([ndimage.distance_transform_edt(labels != i) for i in ids])
    distances.sort(axis=0)
    term = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    total, fg = labels.size, int((labels > 0).sum())
    weights = np.where(labels > 0, total / (2.0 * fg), total / (2.0 * (total - fg)))
    return np.where(labels > 0, weights, weights + term).astype(np.float32)


def measured(function, *args):
    tracemalloc.start()
    start = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def main():
    labels = touching_cells(1024, 300)
    count = len(np.unique(labels)) - 1
    ours, ours_s, ours_peak = measured(border_weight_map, labels)
    ref, ref_s, ref_peak = measured(common_recipe, labels)
    print(f"1024 x 1024, {count} cells:")
    print(f"  ours:          {ours_s:7.3f} s   peak {ours_peak / 1e6:7.1f} MB")
    print(f"  common recipe: {ref_s:7.3f} s   peak {ref_peak / 1e6:7.1f} MB")
    print(f"  speed-up {ref_s / ours_s:.0f}x, max abs difference {np.abs(ours - ref).max():.2e}")
    big = touching_cells(2048, 1200, seed=1)
    _, big_s, big_peak = measured(border_weight_map, big)
    print(
        f"2048 x 2048, {len(np.unique(big)) - 1} cells: ours {big_s:.3f} s, "
        f"peak {big_peak / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
