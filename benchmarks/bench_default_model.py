"""Accuracy of the bundled default model on its held-out validation images (dsb2018_fluo).

The model was trained by ``tiled-unet train`` on all images of the folder (sorted by name, as the
shell expands ``*_image.tif``); the images it held out are recorded in the model's metadata
(``validation_samples``, indices into that sorted list). For each held-out image this prints
AP@0.5 (TP / (TP + FP + FN), one-to-one matching at IoU >= 0.5), pixel IoU of foreground, the
object counts, with ``--diameter`` the object diameter the run worked with (px) and its
working-scale factor, and the means over images; then AP@0.5 pooled over all objects, the touching
ground-truth pairs the prediction splits, and the time for one 1024 x 1024 image.

    python benchmarks/bench_default_model.py [--model M] [--data ../shared/data/dsb2018_fluo/train]
        [--scale S] [--noise N] [--diameter PX|auto]

``--scale 3`` upscales each image (linear) and its labels (nearest) 3 times before segmenting,
and scores at that scale: with ``--diameter auto`` it measures how well the object-size
estimate brings nuclei of another size back to the model's. ``--noise 0.05`` then adds
independent Gaussian noise to every pixel (standard deviation 5% of the image's 1st-99.8th
percentile range, seeded per image), as a camera with smaller pixels records: fewer photons
each, the noise not smoothed by the upscaling.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage

from napari_tiled_unet.core.metrics import match_objects, pixel_iou, split_touching_pairs
from napari_tiled_unet.core.modelfile import load_model
from napari_tiled_unet.core.postprocess import decode_plane, postprocess_options
from napari_tiled_unet.core.predict import predict_array
from napari_tiled_unet.core.segment import segment
from napari_tiled_unet.core.targets import engine_output
from napari_tiled_unet.models import DEFAULT_MODEL

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_fluo" / "train"


def held_out_images(model, folder: Path) -> list[Path]:
    """The image files the model was validated on (never trained on)."""
    images = sorted(folder.glob("*_image.tif"))
    indices = model.metadata.get("validation_samples")
    if not indices:
        raise SystemExit(
            "model: its metadata lists no validation_samples (not trained by tiled-unet train?)"
        )
    if len(images) <= max(indices):
        raise SystemExit(
            f"--data: expected the model's training folder (at least {max(indices) + 1} "
            f"*_image.tif), found {len(images)} in {folder}"
        )
    return [images[i] for i in indices]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threshold", type=float, help="default: the model's recommendation")
    parser.add_argument("--min-size", type=int, help="default: the model's recommendation")
    parser.add_argument("--split", type=int, help="default: the model's recommendation")
    parser.add_argument("--min-peak", type=float, help="default: the model's recommendation")
    parser.add_argument("--scale", type=float, default=1.0, help="upscale images and labels first")
    parser.add_argument(
        "--noise", type=float, default=0.0, help="pixel noise, fraction of the image's range"
    )
    parser.add_argument(
        "--diameter", default=None, help="object diameter in px, or auto (default: none)"
    )
    args = parser.parse_args()
    diameter = (
        None
        if args.diameter is None
        else (args.diameter if args.diameter == "auto" else float(args.diameter))
    )
    model = load_model(args.model)
    paths = held_out_images(model, args.data)
    options = postprocess_options(
        model.metadata, args.threshold, args.min_size, args.split, args.min_peak
    )
    print(
        f"model {args.model} ({model.metadata.get('trained_iterations')} iterations); "
        f"{len(paths)} held-out images from {args.data}; threshold {options.threshold}, min size "
        f"{options.min_size} px, split {options.split} px, min peak {options.min_peak}; scale "
        f"{args.scale}, noise {args.noise}, diameter {args.diameter}"
    )
    print(
        f"{'image':<14} {'shape':>11} {'true':>5} {'found':>6} {'AP@0.5':>7} {'IoU':>6}"
        f" {'diameter':>8} {'factor':>6}"
    )
    aps, ious, seconds, pooled, touching = [], [], 0.0, np.zeros(3, int), np.zeros(2, int)
    for path in paths:
        image = tifffile.imread(path)
        truth = tifffile.imread(str(path).replace("_image.tif", "_labels.tif"))
        if args.scale != 1.0:
            image = ndimage.zoom(image, args.scale, order=1)
            truth = ndimage.zoom(truth, args.scale, order=0)
        if args.noise:
            image = with_pixel_noise(image, args.noise, seed=len(aps))
        start = time.perf_counter()
        worked_at = (None, 1.0)
        if diameter is None:
            predicted = decoded(model, image, options)
        else:
            events = list(segment(model, image, **options._asdict(), diameter=diameter))
            (plane,) = [p for e in events for p in e.planes]
            predicted = plane.labels
            worked_at = (events[-1].diameter, events[-1].factor)
        seconds += time.perf_counter() - start
        scores = match_objects(predicted, truth, 0.5)
        aps.append(scores.ap)
        pooled += (scores.tp, scores.fp, scores.fn)
        ious.append(pixel_iou(predicted, truth))
        touching += split_touching_pairs(predicted, truth)
        print(
            f"{path.name[:12]:<14} {'x'.join(map(str, image.shape)):>11} {scores.tp + scores.fn:5d} "
            f"{scores.tp + scores.fp:6d} {scores.ap:7.3f} {ious[-1]:6.3f}"
            f" {'-' if worked_at[0] is None else f'{worked_at[0]:.1f}':>8} {worked_at[1]:6.3f}"
        )
    print(
        f"\nmean over {len(paths)} images: AP@0.5 {np.mean(aps):.3f}, pixel IoU {np.mean(ious):.3f} "
        f"(median AP@0.5 {np.median(aps):.3f}); {seconds:.1f} s for inference and labelling"
    )
    tp, fp, fn = pooled
    print(
        f"pooled over all {tp + fn} held-out objects: AP@0.5 {tp / max(tp + fp + fn, 1):.3f} "
        f"(TP {tp}, FP {fp}, FN {fn})"
    )
    print(
        f"touching ground-truth pairs split: {touching[0]} of {touching[1]} "
        f"({touching[0] / max(touching[1], 1):.1%})"
    )
    noise = np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8)
    nuclei = np.pad(tifffile.imread(paths[0]), ((0, 1024), (0, 1024)), mode="symmetric")
    print(
        f"one 1024 x 1024 image, inference and labelling: "
        f"{time_1024(model, noise[:1024, :1024], options):.2f} s of noise, "
        f"{time_1024(model, nuclei[:1024, :1024], options):.2f} s of nuclei ({paths[0].name[:12]} "
        f"mirrored; best of 3; {torch.get_num_threads()} CPU threads, device auto)"
    )


def with_pixel_noise(image: np.ndarray, level: float, seed: int) -> np.ndarray:
    """``image`` (float32) plus Gaussian noise of ``level`` times its 1st-99.8th percentile range."""
    low, high = np.percentile(image, (1, 99.8))
    noise = np.random.default_rng(seed).normal(0, level * (high - low), image.shape)
    return (image + noise).astype(np.float32)


def decoded(model, image: np.ndarray, options) -> np.ndarray:
    """Instance labels of ``image`` (Y, X) at its own scale, with ``options``
    (:class:`PostprocessOptions`)."""
    maps = predict_array(model, image, output=engine_output(model.config))
    return decode_plane(
        maps,
        options.threshold,
        options.min_size,
        model.config.output_mode,
        options.split,
        options.min_peak,
    )


def time_1024(model, image: np.ndarray, options) -> float:
    """Best of 3: seconds to segment ``image`` (1024 x 1024) with ``options``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        decoded(model, image, options)
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
