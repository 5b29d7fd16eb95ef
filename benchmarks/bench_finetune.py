"""Fine-tuning the bundled model on a few annotated nuclei: the score before and after.

What a user does in napari with *Start from: bundled default*: paint a few nuclei of one image
inside a region (a Shapes rectangle), press Train. Here, on one of the bundled model's held-out
dsb2018_fluo images (by default the one it scores worst on among those with at least 20
nuclei), the ``--objects`` nuclei nearest the image centre are "painted" (the region is their
bounding box, fully annotated), the model is fine-tuned with the core fine-tuning preset
(:mod:`napari_tiled_unet.core.presets`), and AP@0.5 is printed before and after on

- the rest of that image (nuclei that do not touch the region), and
- the other held-out images of the same size (the same acquisition, as far as DSB tells).

Fine-tuning writes its starting model first and replaces it only with a fine-tuned one that
validates better (``core.train.beats_start``: a higher AP@0.5, or pixel IoU up by 0.03 /
sqrt(validation objects), and lower on neither), so "after" is what the user gets.

    python benchmarks/bench_finetune.py [--data ../shared/data/dsb2018_fluo/train] [--image N]
        [--objects 5] [--iterations N] [--lr X] [--anchor X] [--val-fraction F]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_default_model import DATA, decoded, held_out_images  # noqa: E402

from napari_tiled_unet.core.metrics import match_objects  # noqa: E402
from napari_tiled_unet.core.modelfile import load_model  # noqa: E402
from napari_tiled_unet.core.postprocess import postprocess_options  # noqa: E402
from napari_tiled_unet.core.train import Sample, TrainConfig, train  # noqa: E402
from napari_tiled_unet.models import DEFAULT_MODEL  # noqa: E402


def painted_region(truth: np.ndarray, count: int) -> np.ndarray:
    """The bounding box of the ``count`` nuclei nearest the image centre, as a region mask."""
    ids = np.unique(truth[truth > 0])
    centre = np.array(truth.shape) / 2
    centroids = np.array([np.argwhere(truth == i).mean(axis=0) for i in ids])
    chosen = ids[np.argsort(np.hypot(*(centroids - centre).T))[:count]]
    rows, cols = np.nonzero(np.isin(truth, chosen))
    region = np.zeros(truth.shape, bool)
    region[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return region


def outside(labels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``labels`` without the objects that touch ``region``."""
    touching = np.unique(labels[region & (labels > 0)])
    return np.where(np.isin(labels, touching), 0, labels)


def ap(model, image, truth, region=None) -> float:
    predicted = decoded(model, image, postprocess_options(model.metadata))
    if region is not None:
        predicted, truth = outside(predicted, region), outside(truth, region)
    return match_objects(predicted, truth, 0.5).ap


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--image", type=int, help="index into the held-out images (default: worst)")
    parser.add_argument("--objects", type=int, default=5, help="nuclei painted")
    parser.add_argument("--iterations", type=int, help="default: the fine-tuning preset's")
    parser.add_argument("--lr", type=float, help="default: the fine-tuning preset's")
    parser.add_argument("--anchor", type=float, help="L2-SP weight (default: the preset's)")
    parser.add_argument("--val-fraction", type=float, help="default: TrainConfig's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = load_model(DEFAULT_MODEL)
    held = held_out_images(start, args.data)
    pairs = [
        (tifffile.imread(p), tifffile.imread(str(p).replace("_image", "_labels"))) for p in held
    ]
    if args.image is None:
        scores = [ap(start, image, truth) if truth.max() >= 20 else 2.0 for image, truth in pairs]
        args.image = int(np.argmin(scores))
    image, truth = pairs[args.image]
    similar = [p for i, p in enumerate(pairs) if i != args.image and p[0].shape == image.shape]
    region = painted_region(truth, args.objects)
    painted = np.where(region, truth, 0)
    print(
        f"image {held[args.image].name[:12]} {image.shape}: {int(truth.max())} nuclei, "
        f"{len(np.unique(painted)) - 1} painted in a {region.sum()} px region; "
        f"{len(similar)} similar held-out images"
    )

    settings = {"seed": args.seed, "device": "cpu"}
    if args.iterations:
        settings["iterations"] = args.iterations
    if args.lr:
        settings["lr"] = args.lr
    if args.anchor is not None:
        settings["anchor"] = args.anchor
    if args.val_fraction is not None:
        settings["val_fraction"] = args.val_fraction
    config = TrainConfig.fine_tuning(**settings)
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "tuned.safetensors"
        events = list(
            train([Sample(image, painted, region)], output, config=config, init=DEFAULT_MODEL)
        )
        tuned = load_model(output)
    last = events[-1]
    print(
        f"fine-tuned {config.iterations} iterations (lr {config.lr:g}, {config.lr_schedule}, "
        f"anchor {config.anchor:g}) in "
        f"{last.seconds:.0f} s on {last.data.describe()}; validation AP@0.5 / IoU: start "
        f"{last.baseline['ap50']:.3f} / {last.baseline['iou']:.3f}, output (iteration "
        f"{last.best['iteration']}) {last.best['ap50']:.3f} / {last.best['iou']:.3f}"
        f"{' = the starting model, kept' if last.kept_start else ''}"
    )
    history = ", ".join(
        f"{e.iteration} {e.metrics['ap50']:.3f}/{e.metrics['iou']:.3f}" for e in events if e.metrics
    )
    print(f"validations (iteration AP@0.5/IoU): {history}")
    print(f"{'AP@0.5':<28} {'before':>7} {'after':>7}")
    rows = {
        "rest of the image": [(image, truth, region)],
        "similar images (mean)": [(i, t, None) for i, t in similar],
    }
    for name, cases in rows.items():
        if not cases:
            continue
        before, after = (np.mean([ap(m, i, t, r) for i, t, r in cases]) for m in (start, tuned))
        print(f"{name:<28} {before:7.3f} {after:7.3f}")


if __name__ == "__main__":
    main()
