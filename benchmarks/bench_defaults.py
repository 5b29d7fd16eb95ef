"""From-scratch training defaults: the old ones against the core presets, at equal budget.

Trains a new model twice per data set, with the same seed, data and iterations:

- **old**: the command line's defaults before the presets (a depth-3, 16-channel U-Net without
  normalisation layers, Adam at 1e-4, constant);
- **new**: ``core.presets`` (the same U-Net with batch normalisation, Adam at 1e-3 with cosine
  decay), what ``tiled-unet train`` and the Train widget now start from.

Two data sets of different looks: a subset of ../shared/data/dsb2018_fluo (bright nuclei on
dark), and synthetic dark, textured cells of about 36 px on a bright uneven background (a
bright-field-like look the bundled model never saw). Prints AP@0.5 (mean over held-out images)
and pixel IoU for each.

``--painted N`` annotates only the N nuclei nearest each training image's centre, inside their
bounding box (a region, as a napari user paints a few nuclei in a Shapes rectangle); the
held-out images are scored in full.

    python benchmarks/bench_defaults.py [--iterations 400] [--images 60] [--painted N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import painted_region  # noqa: E402

from napari_tiled_unet.core.metrics import match_objects, pixel_iou  # noqa: E402
from napari_tiled_unet.core.model import UNetConfig  # noqa: E402
from napari_tiled_unet.core.modelfile import load_model  # noqa: E402
from napari_tiled_unet.core.postprocess import label_plane  # noqa: E402
from napari_tiled_unet.core.predict import predict_array  # noqa: E402
from napari_tiled_unet.core.presets import SCRATCH, SCRATCH_ARCHITECTURE  # noqa: E402
from napari_tiled_unet.core.train import Sample, TrainConfig, train  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_fluo" / "train"

RECIPES = {
    "old": (UNetConfig(depth=3, base_channels=16), {"lr": 1e-4, "lr_schedule": "constant"}),
    "new": (SCRATCH_ARCHITECTURE, {"lr": SCRATCH.lr, "lr_schedule": SCRATCH.lr_schedule}),
}


def dsb_subset(count: int, seed: int):
    images = sorted(DATA.glob("*_image.tif"))
    picked = [images[i] for i in np.random.default_rng(seed).permutation(len(images))[:count]]
    return [
        (tifffile.imread(p), tifffile.imread(str(p).replace("_image", "_labels"))) for p in picked
    ]


def synthetic_cells(count: int, seed: int, size: int = 256):
    """Dark textured cells (about 36 px, some touching) on a bright, uneven background."""
    rng = np.random.default_rng(seed)
    samples = []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(count):
        labels = np.zeros((size, size), np.uint16)
        for index in range(1, 13):
            cy, cx = rng.uniform(20, size - 20, 2)
            ry, rx = rng.uniform(14, 22, 2)
            cell = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            labels[cell & (labels == 0)] = index
        background = 0.75 + 0.1 * np.sin(xx / 40.0 + rng.uniform(0, 6))
        texture = ndimage.gaussian_filter(rng.normal(0, 0.08, (size, size)), 1.5)
        image = np.where(labels > 0, 0.35 + texture, background)
        rims = ndimage.morphological_gradient(labels, size=3) > 0
        image = np.where(rims, 0.2, image) + rng.normal(0, 0.03, (size, size))
        samples.append(((image * 255).clip(0, 255).astype(np.uint8), labels))
    return samples


def score(model, held_out) -> tuple[float, float]:
    aps, ious = [], []
    for image, truth in held_out:
        predicted = label_plane(predict_array(model, image), 0.5, 10)
        aps.append(match_objects(predicted, truth, 0.5).ap)
        ious.append(pixel_iou(predicted, truth))
    return float(np.mean(aps)), float(np.mean(ious))


def training_sample(image, labels, painted: int | None) -> Sample:
    """The whole annotation, or only the ``painted`` nuclei nearest the centre in their box."""
    if not painted:
        return Sample(image, labels)
    region = painted_region(labels, painted)
    return Sample(image, np.where(region, labels, 0), region)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--images", type=int, default=60, help="DSB images (a quarter held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--painted", type=int, help="nuclei annotated per training image")
    args = parser.parse_args()
    sets = {
        "dsb2018 subset": dsb_subset(args.images, args.seed),
        "synthetic dark cells": synthetic_cells(args.images, args.seed),
    }
    painted = f", {args.painted} nuclei painted per training image" if args.painted else ""
    print(f"{args.iterations} iterations, batch 4, patch 252, seed {args.seed}, CPU{painted}")
    print(f"{'data':<22} {'defaults':<8} {'AP@0.5':>7} {'IoU':>6} {'time':>7}")
    for name, pairs in sets.items():
        held = len(pairs) // 4
        samples = [training_sample(image, labels, args.painted) for image, labels in pairs[held:]]
        for recipe, (architecture, settings) in RECIPES.items():
            config = TrainConfig(
                iterations=args.iterations,
                validate_every=args.iterations,
                seed=args.seed,
                device="cpu",
                **settings,
            )
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                output = Path(folder) / "m.safetensors"
                list(train(samples, output, config=config, model_config=architecture))
                seconds = time.perf_counter() - start
                ap50, iou = score(load_model(output), pairs[:held])
            print(f"{name:<22} {recipe:<8} {ap50:7.3f} {iou:6.3f} {seconds:6.0f}s")


if __name__ == "__main__":
    main()
