"""Where the time goes in GPU (or CPU) inference: network alone, engine, and the whole CLI.

For each network (the bundled model, and a 4-level / 32-channel U-Net with random weights) it
prints, at the engine's automatic tile size and batch on the chosen device:

- forward only: the network plus softmax on device-resident tiles, output MP/s;
- ``predict()``: the engine from the TIFF stack on disk into a sink that drops the results;
- end to end: ``tiled-unet segment STACK -o labels.tif`` (read, predict, label, write);
- a breakdown: reading the raw tiles alone, labelling alone, writing the labels alone.

``--stand-in`` replaces the network by a trivial module with the bundled model's geometry
(crop the margin, two logits from the input), so the figures are the pipeline's own: run it on
a CPU-only machine to measure the host side. The stack is made by
``sample_data/make_big_stack.py`` (64 x 4096 x 4096 uint8, 1.07 Gpx) when missing.

    python benchmarks/bench_gpu.py [--stand-in] [--stack bench_data/big.tif] [--device auto]
        [--nets bundled,unet32] [--skip-e2e]

Run it against another checkout with ``PYTHONPATH=that/src`` to compare versions side by side
(stages the older engine lacks print "n/a").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import napari_tiled_unet
from napari_tiled_unet import cli
from napari_tiled_unet.core import modelfile
from napari_tiled_unet.core.io import read_tiff
from napari_tiled_unet.core.model import UNet, UNetConfig
from napari_tiled_unet.core.predict import predict, resolve_device
from napari_tiled_unet.models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]


class StandIn(UNet):
    """The bundled model's geometry with a trivial forward: the input, cropped by the margin,
    as a single logit (a view: the network costs nothing, the engine's own work all remains;
    nuclei brighter than about 40% of the plane's range come out as objects)."""

    def forward(self, x):
        c = self.margin // 2
        return x[:, :1, c : x.shape[-2] - c, c : x.shape[-1] - c]


class Discard:
    """An engine target that drops what it is given (measures the pipeline, not the store)."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __setitem__(self, key, value):
        pass


def networks(names, stand_in: bool):
    bundled = modelfile.load_model(DEFAULT_MODEL)
    if stand_in:
        model = StandIn(bundled.config)
        model.normalization = bundled.normalization
        model.metadata = {"postprocess": {"threshold": 0.6, "min_size": 25}}
        return {"stand-in": model.eval()}
    found = {}
    if "bundled" in names:
        found["bundled"] = bundled
    if "unet32" in names:
        torch.manual_seed(0)
        net = UNet(UNetConfig(depth=4, base_channels=32)).eval()
        net.normalization, net.metadata = bundled.normalization, {}
        found["unet32 (depth 4)"] = net
    return found


def engine_tile(model, device, precision):
    from napari_tiled_unet.core import predict as engine

    resolved = engine._resolve_precision(precision, device)
    batch = 4 if device.type == "cuda" else 1
    from napari_tiled_unet.core.tiling import plan_axis

    tile = engine._auto_tile(model, device, resolved, batch)
    return plan_axis(10**6, tile, model).input_size, batch, resolved  # largest legal <= tile


def forward_only(model, device, precision, seconds=3.0):
    tile, batch, resolved = engine_tile(model, device, precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.rand(batch, model.config.in_channels, tile, tile, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    out = model.output_size(tile)
    runs, start = 0, None
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        while start is None or time.perf_counter() - start < seconds:
            torch.softmax(model(x).float(), dim=1)
            if start is None:  # the first pass warms up kernels and allocators
                _sync(device)
                start = time.perf_counter()
                continue
            runs += 1
        _sync(device)
    elapsed = time.perf_counter() - start
    return runs * batch * out * out / elapsed / 1e6, f"tile {tile}, batch {batch}, {resolved}"


def predict_only(model, data, device, precision):
    out = Discard(data.shape)
    start = time.perf_counter()
    last = None
    for last in predict(model, data, out, device=str(device), precision=precision):  # noqa: B007 (the last event is read below)
        pass
    _sync(device)
    elapsed = time.perf_counter() - start
    return data.size / elapsed / 1e6, elapsed, last.tile_shape


def end_to_end(model, stack: Path, device, precision):
    real = modelfile.load_model
    modelfile.load_model = lambda path: model  # the CLI loads "its" model: ours
    try:
        with tempfile.TemporaryDirectory(dir=stack.parent) as folder:
            target = Path(folder) / "labels.tif"
            start = time.perf_counter()
            code = cli.main(
                [
                    "segment",
                    str(stack),
                    "-o",
                    str(target),
                    "--quiet",
                    "--device",
                    str(device),
                    "--precision",
                    precision,
                ]
            )
            elapsed = time.perf_counter() - start
    finally:
        modelfile.load_model = real
    if code != 0:
        raise SystemExit(f"segment failed with exit code {code}")
    return elapsed


def reading_only(model, data):
    try:
        from napari_tiled_unet.core import predict as engine

        job = engine._Job.checked(
            model,
            data,
            Discard(data.shape),
            None,
            "foreground",
            "auto",
            1,
            "cpu",
            "fp32",
            None,
            None,
            False,
        )
        plan = engine._balanced_plan(
            data.shape[-2:], engine._auto_tile(model, torch.device("cpu"), "fp32", 1), model, True
        )
        reader = engine._Reader(job, plan, job.leads, 0, ahead=8)
    except (AttributeError, TypeError):
        return None
    start = time.perf_counter()
    for item in reader.items():
        item.stats.result()
    return time.perf_counter() - start


def labelling_only(model, data, planes=4):
    from napari_tiled_unet.core.postprocess import decode_plane, postprocess_options

    threshold, min_size, split, min_peak = postprocess_options(model.metadata)
    probability = np.asarray(data[0], np.float32) / 255.0
    start = time.perf_counter()
    for _ in range(planes):
        decode_plane(probability, threshold, min_size, "paper", split, min_peak)
    return (time.perf_counter() - start) / planes


def writing_only(data, folder: Path, planes=4):
    from napari_tiled_unet.core.io import write_tiff_stream

    labels = (np.asarray(data[0]) > 128).astype(np.uint32)
    start = time.perf_counter()
    write_tiff_stream(
        folder / "w.tif",
        (planes,) + labels.shape,
        np.uint32,
        "ZYX",
        (labels for _ in range(planes)),
        True,
    )
    return (time.perf_counter() - start) / planes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ensure_stack(path: Path) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"making {path} (64 x 4096 x 4096 uint8) ...", flush=True)
    sys.argv = ["make_big_stack", str(path), "--planes", "64", "--size", "4096"]
    sys.path.insert(0, str(ROOT / "sample_data"))
    import make_big_stack

    make_big_stack.main()
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", type=Path, default=ROOT / "bench_data" / "big.tif")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--nets", default="bundled,unet32")
    parser.add_argument(
        "--stand-in", action="store_true", help="trivial network: the pipeline's own speed"
    )
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    stack = ensure_stack(args.stack)
    data = read_tiff(stack).data
    plane_mp = data.shape[-1] * data.shape[-2] / 1e6
    print(f"napari_tiled_unet from {Path(napari_tiled_unet.__file__).parent}")
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; stack {stack.name} "
        f"{data.shape} {data.dtype} ({data.size / 1e9:.2f} Gpx)"
    )
    for name, model in networks(args.nets.split(","), args.stand_in).items():
        print(f"\n== {name}")
        rate, how = forward_only(model, device, args.precision)
        print(f"forward only:            {rate:8.1f} MP/s  ({how})")
        rate, elapsed, tile = predict_only(model, data, device, args.precision)
        print(f"predict() from disk:     {rate:8.1f} MP/s  ({elapsed:.1f} s, tile {tile})")
        if not args.skip_e2e:
            elapsed = end_to_end(model, stack, device, args.precision)
            print(
                f"end to end (CLI):        {data.size / elapsed / 1e6:8.1f} MP/s  ({elapsed:.1f} s, labels written)"
            )
        reading = reading_only(model, data)
        print("breakdown, one stage alone on this machine:")
        print(
            "  read raw tiles:        "
            + (
                "     n/a"
                if reading is None
                else f"{data.size / reading / 1e6:8.1f} MP/s  ({reading:.1f} s)"
            )
        )
        labelling = labelling_only(model, data)
        print(
            f"  label a plane:         {plane_mp / labelling:8.1f} MP/s  ({labelling * 1e3:.0f} ms per plane, one thread)"
        )
        with tempfile.TemporaryDirectory(dir=stack.parent) as folder:
            writing = writing_only(data, Path(folder))
        print(
            f"  write a labels plane:  {plane_mp / writing:8.1f} MP/s  ({writing * 1e3:.0f} ms per plane, zlib)"
        )


if __name__ == "__main__":
    main()
