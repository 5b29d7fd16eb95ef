"""Peak memory of `tiled-unet segment` on uint16 TIFF stacks from disk, for two stack sizes,
and on one huge uint8 plane (a whole-slide scan).

Writes synthetic stacks (bright blobs on a noisy background, 2048 x 2048 planes) into a scratch
folder, segments each with a small model on the CPU in a fresh process, and prints that
process's peak RSS. Bounded memory means: well under 1 GB, and the same for both sizes. The
huge plane (``--single-plane 20000``: 20000 x 20000) is segmented block by block, as the CLI
does for planes over ``cli.HUGE_PLANE_PIXELS``, and, for comparison, whole (that path forced).

    python benchmarks/bench_memory.py [--scratch DIR] [--planes 256 512] [--single-plane 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PLANE = (2048, 2048)

CHILD = """
import json, os, resource, sys, time
from napari_tiled_unet import cli
from napari_tiled_unet.cli import main
if os.environ.get("BENCH_WHOLE_PLANES"):
    cli.HUGE_PLANE_PIXELS = 1 << 62
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"code": code, "seconds": seconds, "peak_rss": peak}))
"""


def synthetic_planes(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: PLANE[0], : PLANE[1]]
    base = (300 + 2000 * ((np.sin(yy / 23.0) * np.sin(xx / 29.0)) > 0.6)).astype(np.uint16)
    noise = rng.integers(0, 200, size=(16,) + PLANE, dtype=np.uint16)
    for index in range(count):
        yield base + noise[index % 16]


def write_stack(path: Path, planes: int) -> None:
    from napari_tiled_unet.core.io import write_tiff_stream

    write_tiff_stream(path, (planes,) + PLANE, np.uint16, "ZYX", synthetic_planes(planes))


def write_model(path: Path) -> None:
    import torch

    from napari_tiled_unet.core.model import UNet, UNetConfig
    from napari_tiled_unet.core.modelfile import save_model

    torch.manual_seed(0)
    save_model(UNet(UNetConfig(depth=2, base_channels=4)), path)


def segment(stack: Path, model: Path, out: Path, whole_planes: bool = False) -> dict:
    import os

    args = [
        str(stack),
        "-o",
        str(out),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--quiet",
        "--overwrite",
    ]
    env = {**os.environ, **({"BENCH_WHOLE_PLANES": "1"} if whole_planes else {})}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, "segment", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def huge_plane(folder: Path, side: int) -> None:
    """One side x side uint8 plane of blobs: block by block (the CLI's path) and whole."""
    import tifffile

    path = folder / "plane.tif"
    # Row by row: a child's peak RSS counts what its parent held when it was started.
    columns = np.sin(np.arange(side) / 29.0)
    rows = ((40 + 150 * (np.sin(y / 23.0) * columns > 0.6)).astype(np.uint8) for y in range(side))
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(rows, shape=(side, side), dtype=np.uint8, metadata={"axes": "YX"})
    for label, whole in (("in blocks (default)", False), ("whole plane (forced)", True)):
        figures = segment(path, folder / "model.safetensors", folder / "labels.tif", whole)
        if figures["code"] != 0:
            raise SystemExit(f"segment failed with exit code {figures['code']}")
        print(
            f"{f'1 x {side} x {side} uint8':>28} {path.stat().st_size / 1e9:6.2f} "
            f"{figures['peak_rss'] / 1e6:12.0f} {figures['seconds']:8.1f} "
            f"{side * side / 1e6 / figures['seconds']:6.1f}   {label}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the stacks")
    parser.add_argument("--planes", type=int, nargs=2, default=[128, 256])
    parser.add_argument(
        "--single-plane",
        type=int,
        nargs="*",
        default=[12000, 20000],
        help="sides of huge planes (none: skip)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        folder = Path(folder)
        write_model(folder / "model.safetensors")
        print(f"{'stack':>28} {'GB':>6} {'peak RSS MB':>12} {'seconds':>8} {'MP/s':>6}")
        for planes in [n for n in args.planes if n]:  # 0 skips
            stack = folder / f"stack_{planes}.tif"
            start = time.perf_counter()
            write_stack(stack, planes)
            written = time.perf_counter() - start
            figures = segment(stack, folder / "model.safetensors", folder / "labels.tif")
            if figures["code"] != 0:
                raise SystemExit(f"segment failed with exit code {figures['code']}")
            gigabytes = stack.stat().st_size / 1e9
            megapixels = planes * PLANE[0] * PLANE[1] / 1e6
            print(
                f"{f'{planes} x {PLANE[0]} x {PLANE[1]} uint16':>28} {gigabytes:6.2f} "
                f"{figures['peak_rss'] / 1e6:12.0f} {figures['seconds']:8.1f} "
                f"{megapixels / figures['seconds']:6.1f}   (stack written in {written:.0f} s)"
            )
            stack.unlink()
        for side in args.single_plane:
            huge_plane(folder, side)


if __name__ == "__main__":
    main()
