"""Training on ../shared/data/dsb2018_fluo: border-weighted loss vs plain cross-entropy.

Holds out 10% of the images (fixed seed), trains the same network twice with the same budget
and seed, once with the paper's border-weighted loss and once with plain (unit-weight)
cross-entropy on the same gap targets, and prints iterations/s and, on the held-out images,
AP@0.5 (TP / (TP + FP + FN), mean over images), pixel IoU and the fraction of touching
ground-truth pairs that are split.

    python benchmarks/bench_train.py [--iterations 1500] [--data ../shared/data/dsb2018_fluo/train]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from napari_tiled_unet.core.metrics import match_objects, pixel_iou, split_touching_pairs
from napari_tiled_unet.core.model import UNetConfig
from napari_tiled_unet.core.modelfile import load_model
from napari_tiled_unet.core.postprocess import label_plane
from napari_tiled_unet.core.predict import predict_array
from napari_tiled_unet.core.train import Sample, TrainConfig, train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_fluo" / "train"


def load_split(folder: Path, held_out: float, seed: int):
    ids = sorted(p.name[: -len("_image.tif")] for p in folder.glob("*_image.tif"))
    order = np.random.default_rng(seed).permutation(len(ids))
    count = max(1, round(held_out * len(ids)))
    pick = [ids[i] for i in order]
    load = lambda names: [  # noqa: E731
        (tifffile.imread(folder / f"{n}_image.tif"), tifffile.imread(folder / f"{n}_labels.tif"))
        for n in names
    ]
    return load(pick[count:]), load(pick[:count])


def evaluate(model, images) -> dict:
    aps, ious, split, touching, found, true = [], [], 0, 0, 0, 0
    for image, truth in images:
        predicted = label_plane(predict_array(model, image), 0.5)
        scores = match_objects(predicted, truth, 0.5)
        aps.append(scores.ap)
        found, true = found + scores.tp + scores.fp, true + scores.tp + scores.fn
        ious.append(pixel_iou(predicted, truth))
        done, total = split_touching_pairs(predicted, truth)
        split, touching = split + done, touching + total
    return {
        "ap50": float(np.mean(aps)),
        "iou": float(np.mean(ious)),
        "split": split / max(touching, 1),
        "touching": touching,
        "objects": found / true,
    }


def run(name, training, config, model_config, folder) -> tuple[dict, float]:
    output = folder / f"{name.replace(' ', '_')}.safetensors"
    step_seconds, previous = [], 0.0
    for event in train(training, output, config=config, model_config=model_config):
        if event.metrics:
            print(
                f"  [{name}] iteration {event.iteration}: loss {event.loss:.4f}, "
                f"validation AP@0.5 {event.metrics['ap50']:.3f} IoU {event.metrics['iou']:.3f}",
                flush=True,
            )
        else:  # a plain training step (events after a validation include its time)
            step_seconds.append(event.seconds - previous)
        previous = event.seconds
    return load_model(output), 1.0 / float(np.median(step_seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=188)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", type=Path, help="folder to keep the trained models in")
    args = parser.parse_args()
    training_images, held_out = load_split(args.data, 0.1, args.seed)
    training = [Sample(image, labels) for image, labels in training_images]
    print(
        f"{len(training)} training images, {len(held_out)} held out (seed {args.seed}); "
        f"U-Net depth {args.depth}, {args.base_channels} base channels, patch {args.patch}, "
        f"batch {args.batch}, {args.iterations} iterations, lr {args.lr}"
    )
    model_config = UNetConfig(depth=args.depth, base_channels=args.base_channels)
    common = {
        "iterations": args.iterations,
        "batch": args.batch,
        "patch": args.patch,
        "lr": args.lr,
        "validate_every": max(args.iterations // 5, 1),
        "seed": args.seed,
        "device": args.device,
    }
    variants = {
        "border-weighted": TrainConfig(**common),
        "plain CE": TrainConfig(**common, w0=0.0, class_balance=False),
    }
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        for name, config in variants.items():
            model, speed = run(name, training, config, model_config, folder)
            rows.append((name, speed, evaluate(model, held_out)))
    print(
        f"\n{'loss':<16} {'it/s':>6} {'AP@0.5':>7} {'IoU':>6} {'touching pairs split':>22} "
        f"{'objects found / true':>21}"
    )
    for name, speed, scores in rows:
        print(
            f"{name:<16} {speed:6.2f} {scores['ap50']:7.3f} {scores['iou']:6.3f} "
            f"{scores['split']:14.3f} of {scores['touching']} {scores['objects']:21.2f}"
        )


if __name__ == "__main__":
    main()
