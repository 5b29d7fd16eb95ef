"""Command line: ``tiled-unet segment | info``.

Everything is checked before work starts; outputs are written atomically and plane by plane, so
a stack larger than memory streams from disk to disk and an interrupted run leaves no file.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path(__file__).parent / "models" / "default.safetensors"


class UsageError(Exception):
    """Bad input found before work started; printed without a traceback."""


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"tiled-unet {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiled-unet",
        description="U-Net segmentation of microscopy images with exact overlap-tile inference.",
    )
    commands = parser.add_subparsers(dest="command")
    segment = commands.add_parser(
        "segment", help="segment a TIFF image or stack into instance labels",
        description="Segment a TIFF image or stack (any size; read and written plane by plane).",
    )
    segment.add_argument("input", type=Path, help="input TIFF (2D, stack, multichannel)")
    segment.add_argument("-o", "--output", type=Path, required=True, help="labels TIFF to write")
    segment.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    segment.add_argument("--probabilities", type=Path, help="also write foreground probabilities")
    segment.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    segment.add_argument("--tile", default="auto", help="input tile size in pixels, or auto")
    segment.add_argument("--batch", default="auto", help="tiles per forward pass (default auto: 4 on CUDA, 1 on CPU)")
    segment.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    segment.add_argument("--threshold", type=float, default=0.5, help="foreground threshold")
    segment.add_argument("--min-size", type=int, default=0, help="drop smaller objects (pixels)")
    segment.add_argument("--channel-axis", type=int, help="channel axis when the file's metadata has none")
    segment.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    segment.set_defaults(run=_segment)
    info = commands.add_parser("info", help="describe a model file")
    info.add_argument("model", type=Path)
    info.set_defaults(run=_info)
    return parser


def _segment(args) -> int:
    from .core.io import IncompleteWrite, read_tiff, release_mapped_pages, write_tiff_streams
    from .core.modelfile import load_model
    from .core.postprocess import check_postprocess_options
    from .core.predict import predict

    outputs = _checked_outputs(args)
    check_postprocess_options(args.threshold, args.min_size)
    image = read_tiff(args.input, name="input")
    channel_axis = image.channel_axis if args.channel_axis is None else args.channel_axis
    model = load_model(_model_path(args.model))
    stop = _StopFlag()
    sink = _PlaneBuffer(_leading_shape(image.shape, channel_axis), image.shape[-2:])
    events = predict(
        model, image.data, sink, channel_axis=channel_axis, tile=_positive_or_auto("--tile", args.tile),
        batch=_positive_or_auto("--batch", args.batch), device=args.device, precision=args.precision, should_stop=stop,
    )
    counts: list[int] = []
    rows = _label_rows(events, sink, args, counts, on_plane=lambda: release_mapped_pages(image.data))
    plane_shape = sink.shape
    axes = "".join(a for i, a in enumerate(image.axes) if i != _axis_index(channel_axis, image))
    # Labels compress many times over, which matters when their dtype must be wide.
    targets = [(outputs[0], plane_shape, _labels_dtype(sink, args.min_size), axes, True)]
    if args.probabilities:
        targets.append((outputs[1], plane_shape, np.float32, axes, False))
    try:
        with stop.installed():
            write_tiff_streams(targets, rows)
    except (IncompleteWrite, KeyboardInterrupt):
        print("tiled-unet segment: stopped; no output was written", file=sys.stderr)
        return 130
    print(f"{args.output}: {sum(counts)} objects in {len(counts)} plane(s)"
          f"{' (ids restart at 1 in each plane)' if len(counts) > 1 else ''}")
    return 0


def _checked_outputs(args) -> list[Path]:
    outputs = [args.output] + ([args.probabilities] if args.probabilities else [])
    for option, path in zip(("--output", "--probabilities"), outputs):
        if path.exists() and path.resolve() == args.input.resolve():
            raise UsageError(f"{option}: must differ from the input file, got {path}")
        if path.exists() and not args.overwrite:
            raise UsageError(f"{option}: {path} exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise UsageError(f"{option}: folder {path.parent} does not exist")
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise UsageError("--probabilities: must differ from --output")
    return outputs


def _model_path(path: Path | None) -> Path:
    if path is not None:
        return path
    if not DEFAULT_MODEL.is_file():
        raise UsageError("--model: no bundled default model is installed; pass a model file")
    return DEFAULT_MODEL


def _positive_or_auto(option, text):
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{option}: expected a positive integer or 'auto', got {text!r}")
    return value


def _axis_index(channel_axis, image):
    return None if channel_axis is None else channel_axis % len(image.shape)


def _leading_shape(shape, channel_axis):
    channel = None if channel_axis is None else channel_axis % len(shape)
    return tuple(n for i, n in enumerate(shape[:-2]) if i != channel)


def _labels_dtype(sink, min_size) -> np.dtype:
    from .core.postprocess import labels_dtype

    # The file's dtype is fixed before the first plane is labelled: bound the id count by the
    # number of disjoint objects of at least min_size pixels that fit in a plane.
    height, width = sink.shape[-2:]
    return labels_dtype(height * width // max(min_size, 1))


def _label_rows(events, sink, args, counts, on_plane):
    """Drive the engine; yield (labels, probabilities) for each plane as it completes."""
    from .core.postprocess import label_plane

    bar = _ProgressBar(args.quiet)
    emitted = 0
    try:
        for event in events:
            bar.update(event)
            if event.stopped:
                return
            while emitted < event.planes_done:
                probability = sink.pop(emitted)
                labels = label_plane(probability, args.threshold, args.min_size)
                counts.append(int(labels.max()))
                emitted += 1
                on_plane()
                yield labels, probability
    finally:
        bar.close()


class _PlaneBuffer:
    """Array-like target for the engine that keeps only planes still being written."""

    dtype = np.dtype(np.float32)

    def __init__(self, leading, plane_shape):
        self.leading = tuple(leading)
        self.plane_shape = tuple(plane_shape)
        self.shape = self.leading + self.plane_shape
        self.planes: dict[int, np.ndarray] = {}

    def __setitem__(self, key, value):
        index = int(np.ravel_multi_index(key[:-2], self.leading)) if self.leading else 0
        plane = self.planes.setdefault(index, np.zeros(self.plane_shape, np.float32))
        plane[key[-2:]] = value

    def pop(self, index: int) -> np.ndarray:
        return self.planes.pop(index)


class _ProgressBar:
    def __init__(self, quiet):
        self.quiet = quiet
        self.bar = None

    def update(self, event):
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, unit="tile", file=sys.stderr)
        self.bar.total = event.total
        self.bar.n = event.done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _StopFlag:
    """``should_stop`` for the engine, raised by SIGINT / SIGTERM (cluster schedulers)."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._request)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _request(self, *_):
        self.requested = True


def _info(args) -> int:
    from .core.model import UNet, UNetConfig
    from .core.modelfile import read_header

    header = read_header(args.model)
    config = UNetConfig.from_dict(header["config"])
    model = UNet(config)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model file:     {args.model} ({args.model.stat().st_size / 1e6:.1f} MB)")
    print(f"architecture:   U-Net depth {config.depth}, {config.base_channels} base channels, "
          f"{config.padding} padding, norm {config.norm}, {parameters:,} parameters")
    print(f"channels:       {config.in_channels} in, {config.n_classes} classes out")
    print(f"margin:         {model.margin} px (smallest input tile {model.legal_input_size(1)} px)")
    print(f"normalization:  {header['normalization']}")
    for key, value in header["metadata"].items():
        print(f"{key + ':':<15} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
