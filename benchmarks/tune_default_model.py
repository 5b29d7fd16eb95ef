"""Choose the bundled model's threshold and minimum object size on its *training* images.

Runs ``tiled-unet tune`` on every 8th training image of dsb2018_fluo (sorted by name, skipping the
model's held-out validation images, which stay untouched for bench_default_model.py), and
stores the choice in the model file.

    python benchmarks/tune_default_model.py [--model M] [--data ../shared/data/dsb2018_fluo/train] [--every 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_tiled_unet import cli
from napari_tiled_unet.core.modelfile import read_header
from napari_tiled_unet.models import DEFAULT_MODEL

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018_fluo" / "train"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--every", type=int, default=8)
    args = parser.parse_args()
    held_out = set(read_header(args.model)["metadata"]["validation_samples"])
    images = sorted(args.data.glob("*_image.tif"))
    training = [path for index, path in enumerate(images) if index not in held_out]
    chosen = training[:: args.every]
    labels = [path.with_name(path.name.replace("_image.tif", "_labels.tif")) for path in chosen]
    print(f"tuning on {len(chosen)} of {len(training)} training images")
    raise SystemExit(
        cli.main(
            ["tune", str(args.model), "--images", *map(str, chosen), "--labels", *map(str, labels)]
        )
    )


if __name__ == "__main__":
    main()
