"""Throughput of our overlap-tile engine vs MONAI's sliding_window_inference, side by side.

Same architecture (U-Net, 4 poolings, 32 base channels, same random weights): ours with valid
convolutions and exact stitching, MONAI's blending with the same network in "same" padding,
overlap 0.25, gaussian weights, roi = our input tile, the same batch. One 2048 x 2048 image,
fp32 on the CPU, both in this process, alternating runs. With CUDA it also prints our fp32 and
bf16 throughput with the automatic tile size.

    pip install monai   # benchmark only
    python benchmarks/bench_inference.py [--size 2048] [--repeats 2] [--batch auto]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from napari_tiled_unet.core.model import UNet, UNetConfig
from napari_tiled_unet.core.predict import predict


def ours(model, image, device, tile, batch, precision="fp32"):
    out = np.zeros(image.shape, np.float32)
    last = None
    for last in predict(  # noqa: B007 (the last event is returned)
        model, image, out, tile=tile, batch=batch, device=device, precision=precision
    ):
        pass
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, last


def monai(model, image, device, roi, batch, channels_last=False):
    from monai.inferers import sliding_window_inference

    def probabilities(x):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(model(x), dim=1)

    x = torch.from_numpy(image)[None, None].to(device)
    with torch.inference_mode():
        result = sliding_window_inference(
            x, roi, batch, probabilities, overlap=0.25, mode="gaussian"
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result[0, 1].cpu().numpy()


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def compare_on(device, image, batch, repeats):
    torch.manual_seed(0)
    valid = UNet(UNetConfig(depth=4, base_channels=32, padding="valid")).eval().to(device)
    same = UNet(UNetConfig(depth=4, base_channels=32, padding="same")).eval().to(device)
    same.load_state_dict(valid.state_dict())  # identical weights; only the padding differs
    megapixels = image.size / 1e6
    _, (_, event) = timed(ours, valid, image, device, "auto", batch)  # warm-up, picks the tile
    roi = event.tile_shape
    timed(monai, same, image, device, roi, batch_of(batch, device))  # warm-up
    # Our engine converts its model to channels_last; give MONAI that layout too as its best case.
    same_nhwc = copy.deepcopy(same).to(memory_format=torch.channels_last)
    runs = {"ours": [], "monai": [], "monai_nhwc": []}
    for _ in range(repeats):
        runs["ours"].append(timed(ours, valid, image, device, roi, batch)[0])
        runs["monai"].append(timed(monai, same, image, device, roi, batch_of(batch, device))[0])
        runs["monai_nhwc"].append(
            timed(monai, same_nhwc, image, device, roi, batch_of(batch, device), True)[0]
        )
    rate = {name: megapixels / min(seconds) for name, seconds in runs.items()}
    print(
        f"device {device}, image {image.shape[0]} x {image.shape[1]}, fp32, tile {roi}, "
        f"batch {batch_of(batch, device)}, {event.total} tiles (ours); best of {repeats} runs"
    )
    print(f"  ours  (valid, exact stitching, channels_last): {rate['ours']:7.3f} MP/s")
    print(
        f"  MONAI (same, overlap 0.25, gaussian):          {rate['monai']:7.3f} MP/s"
        f"   ratio ours / MONAI: {rate['ours'] / rate['monai']:.2f}x"
    )
    print(
        f"  MONAI, model and input channels_last:          {rate['monai_nhwc']:7.3f} MP/s"
        f"   ratio ours / MONAI: {rate['ours'] / rate['monai_nhwc']:.2f}x"
    )


def batch_of(batch, device):
    if batch != "auto":
        return int(batch)
    return 4 if device.startswith("cuda") else 1


def cuda_precisions(image, repeats):
    torch.manual_seed(0)
    model = UNet(UNetConfig(depth=4, base_channels=32)).eval()
    megapixels = image.size / 1e6
    for precision in ("fp32", "bf16"):
        ours(model, image, "cuda", "auto", "auto", precision)
        best, event = float("inf"), None
        for _ in range(repeats):
            seconds, (_, event) = timed(ours, model, image, "cuda", "auto", "auto", precision)
            best = min(best, seconds)
        print(
            f"  ours on {torch.cuda.get_device_name()}, {precision}, auto tile "
            f"{event.tile_shape}: {megapixels / best:8.1f} MP/s"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", default="auto")
    args = parser.parse_args()
    image = np.random.default_rng(0).random((args.size, args.size), dtype=np.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    compare_on("cpu", image, args.batch, args.repeats)
    if torch.cuda.is_available():
        compare_on("cuda", image, args.batch, args.repeats)
        cuda_precisions(
            np.random.default_rng(0).random((8192, 8192), dtype=np.float32), args.repeats
        )


if __name__ == "__main__":
    main()
