"""Assemble a large (Z, Y, X) TIFF stack from the sample images, for trying big-stack work offline.

Each plane is a mosaic of the sample nuclei images (randomly flipped and rotated, seeded), with
the matching instance labels written beside it. Planes are streamed to disk one at a time, so
the stack can be far larger than memory (BigTIFF above 4 GB), and files appear only when complete.

    python -m napari_tiled_unet.sample_data.make_big_stack big.tif --planes 64 --size 4096
    (from a checkout: python sample_data/make_big_stack.py big.tif ...)
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import numpy as np
import tifffile

from napari_tiled_unet.core.io import write_tiff_stream

SAMPLES = ("nuclei_a", "nuclei_b")


def load_samples() -> list[tuple[np.ndarray, np.ndarray]]:
    """The sample (image, labels) pairs, shapes (Y, X), uint8 and uint16."""
    folder = resources.files(__package__ or "napari_tiled_unet.sample_data")
    pairs = []
    for stem in SAMPLES:
        with (
            resources.as_file(folder / f"{stem}_image.tif") as image,
            resources.as_file(folder / f"{stem}_labels.tif") as labels,
        ):
            pairs.append((tifffile.imread(image), tifffile.imread(labels)))
    return pairs


def mosaic_plane(samples, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size) image plane and its labels (ids unique within the plane)."""
    image = np.zeros((size, size), np.uint8)
    labels = np.zeros((size, size), np.uint32)
    y = 0
    while y < size:
        x, row_height = 0, 0
        while x < size:
            tile_image, tile_labels = samples[rng.integers(len(samples))]
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            tile_image, tile_labels = (_oriented(a, turns, flip) for a in (tile_image, tile_labels))
            h, w = min(tile_image.shape[0], size - y), min(tile_image.shape[1], size - x)
            offset = labels.max()
            image[y : y + h, x : x + w] = tile_image[:h, :w]
            labels[y : y + h, x : x + w] = np.where(
                tile_labels[:h, :w] > 0, tile_labels[:h, :w] + offset, 0
            )
            x, row_height = x + w, max(row_height, h)
        y += row_height
    return image, labels


def _oriented(array, turns: int, flip: bool):
    array = np.rot90(array, turns)
    return array[:, ::-1] if flip else array


def write_stack(path: Path, planes: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``path`` (uint8 image) and ``<stem>_labels.tif`` (uint32), both (planes, size, size)."""
    samples = load_samples()
    labels_path = path.with_name(path.stem + "_labels.tif")

    def stream(index):
        rng = np.random.default_rng(seed)  # the same planes for the image and its labels
        for _ in range(planes):
            yield mosaic_plane(samples, size, rng)[index]

    for target, dtype, index in ((path, np.uint8, 0), (labels_path, np.uint32, 1)):
        write_tiff_stream(
            target, (planes, size, size), dtype, "ZYX", stream(index), compress=index == 1
        )
    return path, labels_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="image stack to write (the labels go beside it)")
    parser.add_argument("--planes", type=int, default=32)
    parser.add_argument("--size", type=int, default=2048, help="plane height and width (px)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.planes < 1 or args.size < 1:
        parser.error(
            f"--planes and --size: expected positive integers, got {args.planes}, {args.size}"
        )
    if args.output.exists():
        parser.error(f"output: {args.output} exists")
    image, labels = write_stack(args.output, args.planes, args.size, args.seed)
    gigabytes = args.planes * args.size * args.size / 1e9
    print(
        f"wrote {image} ({args.planes} x {args.size} x {args.size}, uint8, {gigabytes:.2f} GB) and {labels}"
    )


if __name__ == "__main__":
    main()
