"""Choose the bundled model's post-processing options on its *training* images.

Runs ``tiled-unet tune`` on every 8th training image of dsb2018_fluo (sorted by name, skipping the
model's held-out validation images, which stay untouched for bench_default_model.py), and
stores the choice in the model file. First it records, when the file lacks it, the range of
object sizes among all the training images (``diameter_range``, as ``tiled-unet train`` records
it for new models), which ``--diameter`` uses to leave objects of a familiar size unscaled.

    python benchmarks/tune_default_model.py [--model M] [--data ../shared/data/dsb2018_fluo/train]
        [--every 8] [--size-range-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tifffile

from napari_tiled_unet import cli
from napari_tiled_unet.core.metrics import diameter_range
from napari_tiled_unet.core.modelfile import load_model, read_header, save_model
from napari_tiled_unet.models import DEFAULT_MODEL

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_fluo" / "train"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--size-range-only", action="store_true", help="do not tune")
    args = parser.parse_args()
    held_out = set(read_header(args.model)["metadata"]["validation_samples"])
    images = sorted(args.data.glob("*_image.tif"))
    training = [path for index, path in enumerate(images) if index not in held_out]
    record_size_range(args.model, [labels_of(path) for path in training])
    if args.size_range_only:
        return
    chosen = training[:: args.every]
    labels = [labels_of(path) for path in chosen]
    print(f"tuning on {len(chosen)} of {len(training)} training images")
    raise SystemExit(
        cli.main(
            ["tune", str(args.model), "--images", *map(str, chosen), "--labels", *map(str, labels)]
        )
    )


def labels_of(image: Path) -> Path:
    return image.with_name(image.name.replace("_image.tif", "_labels.tif"))


def record_size_range(path: Path, label_files: list[Path]) -> None:
    """Store the training objects' size range in the model file (trained without zoom)."""
    model = load_model(path)
    if "diameter_range" in model.metadata:
        return
    sizes = diameter_range(tifffile.imread(f) for f in label_files)
    model.metadata = {**model.metadata, "diameter_range": list(sizes)}
    save_model(model, path)
    print(f"recorded diameter_range {sizes} px from {len(label_files)} training images")


if __name__ == "__main__":
    main()
