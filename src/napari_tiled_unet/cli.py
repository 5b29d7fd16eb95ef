"""Command line: ``tiled-unet segment | train | info``.

Everything is checked before work starts; outputs are written atomically and plane by plane, so
a stack larger than memory streams from disk to disk and an interrupted run leaves no file.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
from pathlib import Path

import numpy as np

from .core.config import MODE_CHANNELS
from .core.presets import FINE_TUNE, SCRATCH, SCRATCH_ARCHITECTURE
from .models import DEFAULT_MODEL


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
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as error:
        if args.debug or not _is_user_error(error):
            raise  # a bug, or asked for: the traceback (exit 1)
        print(f"tiled-unet {args.command}: error: {error}", file=sys.stderr)
        return 2


# User errors name what was wrong first: "--tile: expected ...", "labels (sample 0): ...".
_USER_ERROR = re.compile(r"^[-\w. ]{1,40}( \([^)]*\))?: ")


def _is_user_error(error: Exception) -> bool:
    """Errors about the user's input (printed as one line); any other ValueError is a bug."""
    return (
        not isinstance(error, ValueError)
        or isinstance(error, UsageError)
        or bool(_USER_ERROR.match(str(error)))
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiled-unet",
        description="U-Net segmentation of microscopy images with exact overlap-tile inference.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of every error, input errors included",
    )
    commands = parser.add_subparsers(dest="command")
    segment = commands.add_parser(
        "segment",
        help="segment a TIFF image or stack into instance labels",
        description="Segment a TIFF image or stack (any size; read and written plane by plane).",
    )
    segment.add_argument(
        "input",
        type=Path,
        nargs="+",
        help="input TIFF (2D, stack, multichannel); several, or a folder of TIFFs, "
        "with -o a folder",
    )
    segment.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="labels TIFF to write (a folder for several inputs: NAME_labels.tif), "
        "or an OME-Zarr store (OUT.zarr: block-wise on a Dask cluster)",
    )
    segment.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    segment.add_argument(
        "--probabilities",
        type=Path,
        nargs="?",
        const=True,
        help="also write foreground probabilities: a TIFF path, or no value "
        "with a .zarr output (stored in it)",
    )
    segment.add_argument(
        "--measure",
        action="store_true",
        help="also write a CSV of the objects beside the labels (LABELS.csv): "
        "plane, label, area, centroid, bounding box, mean intensity",
    )
    segment.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)"
    )
    segment.add_argument("--tile", default="auto", help="input tile size in pixels, or auto")
    segment.add_argument(
        "--batch", default="auto", help="tiles per forward pass (default auto: 4 on CUDA, 1 on CPU)"
    )
    segment.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    segment.add_argument(
        "--threshold",
        type=float,
        help="foreground threshold (default: the model's recommendation, else 0.5)",
    )
    segment.add_argument(
        "--min-size",
        type=int,
        help="drop smaller objects, in pixels (default: the model's recommendation, else 0)",
    )
    segment.add_argument(
        "--split",
        type=int,
        metavar="PX",
        help="cut touching objects: where a neck narrower than about 2 PX + 1 pixels joins "
        "them, and between two deep notches of an overlapping pair (2-class models; default: "
        "the model's recommendation, else 0: no cuts)",
    )
    segment.add_argument(
        "--min-peak",
        type=float,
        metavar="P",
        help="keep only objects whose foreground probability reaches P somewhere, 0-1: drops "
        "faint debris and haze that pass the threshold (default: the model's recommendation, "
        "else 0: keep every object)",
    )
    segment.add_argument(
        "--channel-axis",
        type=_channel_axis_arg,
        help="channel axis when the file's metadata has none, or none (every axis but Y, X "
        "is a plane axis; colour images are otherwise averaged to grey for one-channel models)",
    )
    segment.add_argument(
        "--series", type=int, help="image series to read from a file that holds several"
    )
    segment.add_argument(
        "--link-z",
        type=float,
        metavar="IOU",
        help="link objects across Z into 3D ids: an object continues one in the "
        "plane before it that it overlaps with at least this IoU (e.g. 0.5)",
    )
    segment.add_argument(
        "--diameter",
        type=_diameter,
        help="typical object diameter in px, or auto (estimated from the first "
        "plane): planes are segmented where objects match the model's typical "
        "size, labels mapped back; smaller objects of a size it was trained on are "
        "left as they are (default: the image as it is)",
    )
    segment.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    cluster = segment.add_argument_group(
        "cluster (with a .zarr output)",
        "Block-wise segmentation on Dask workers; rerunning the same command resumes.",
    )
    where = cluster.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        metavar="local:N",
        help="start a local Dask cluster of N worker processes (default local:1)",
    )
    where.add_argument(
        "--scheduler", metavar="ADDRESS", help="use a running Dask scheduler, e.g. tcp://HOST:8786"
    )
    cluster.add_argument(
        "--block", type=int, default=None, help="block (= zarr chunk) size in px (default 1024)"
    )
    segment.set_defaults(run=_segment)
    _add_train_parser(commands)
    _add_tune_parser(commands).set_defaults(run=_tune)
    info = commands.add_parser("info", help="describe a model file")
    info.add_argument("model", type=Path)
    info.set_defaults(run=_info)
    return parser


def _segment(args) -> int:
    """One input, or a batch (several inputs or folders into an output folder): everything is
    checked before any work, and the model is loaded once."""
    from .core.io import read_tiff
    from .core.modelfile import load_model, read_header
    from .core.postprocess import postprocess_options

    if args.output.suffix.lower() == ".zarr":
        return _segment_on_cluster(args)
    if args.cluster or args.scheduler or args.block is not None:
        raise UsageError(
            "--cluster, --scheduler and --block: expected a .zarr output "
            f"(-o OUT.zarr), got {args.output}"
        )
    if args.probabilities is True:
        raise UsageError("--probabilities: expected a TIFF path for a TIFF output")
    jobs = _segment_jobs(args)
    # checked first
    postprocess_options(None, args.threshold, args.min_size, args.split, args.min_peak)
    in_channels = int(read_header(_model_path(args.model))["config"].get("in_channels", 1))
    fitted = [
        _fitted(read_tiff(job.input, name="input", series=job.series), job, in_channels)
        for job in jobs
    ]
    outputs = [_checked_outputs(job) for job in jobs]
    for job, (image, _) in zip(jobs, fitted):
        _z_linker(job.link_z, _plane_axes(image))
    model = load_model(_model_path(args.model))
    for job, (image, said), output in zip(jobs, fitted, outputs):
        if said:
            print(f"tiled-unet segment: {job.input.name}: {said}", file=sys.stderr)
        code = _segment_file(job, image, output, model)
        if code != 0:
            return code
    return 0


def _segment_on_cluster(args) -> int:
    """``-o OUT.zarr``: everything checked, the cluster reached, then the blocks run."""
    from .core import distributed
    from .core.channels import grey_message
    from .core.modelfile import load_model

    _refuse_for_zarr(args)
    model_path = _model_path(args.model)
    _check_store_path(args.output, [args.input[0], model_path])
    model = load_model(model_path)
    block = distributed.DEFAULT_BLOCK if args.block is None else args.block
    try:
        job = _block_job(args, args.input[0], args.output, model, block)
    except ValueError as error:
        raise UsageError(_as_option(str(error))) from None
    if job.grey_axis is not None:
        print(
            f"tiled-unet segment: {args.input[0].name}: {grey_message(job.grey_axis)}",
            file=sys.stderr,
        )
    stop = _StopFlag()
    with _dask_client(args) as client, stop.installed():
        try:
            events = distributed.segment_on_cluster(
                job, client, overwrite=args.overwrite, should_stop=stop
            )
        except ValueError as error:
            raise UsageError(_as_option(str(error))) from None
        if client.dashboard_link and not args.quiet:
            print(f"tiled-unet segment: Dask dashboard at {client.dashboard_link}", file=sys.stderr)
        last = _drain_cluster(events, args.quiet)
    if last.stopped:
        print(
            f"tiled-unet segment: stopped after {last.done} of {last.total} blocks; rerun the "
            f"same command to resume",
            file=sys.stderr,
        )
        return stop.exit_code
    resumed = f" ({last.skipped} blocks done by an earlier run)" if last.skipped else ""
    print(f"{args.output}: {last.objects} objects in {last.total} blocks{resumed}")
    return 0


def _block_job(args, source: Path, store: Path, model, block: int):
    """The block-wise job for this command's engine and post-processing options."""
    from .core import distributed
    from .core.postprocess import postprocess_options
    from .core.predict import positive_or_auto

    recommended = postprocess_options(model.metadata)
    unused = [
        f"{what} ({option} {value})"
        for what, option, value, given in (
            ("neck splitting", "--split", recommended.split, args.split),
            ("object floor", "--min-peak", recommended.min_peak, args.min_peak),
        )
        if value and given is None
    ]
    if unused:
        print(
            f"tiled-unet segment: block by block, objects are connected components: the "
            f"model's {' and '.join(unused)} {'needs' if len(unused) == 1 else 'need'} whole "
            f"planes",
            file=sys.stderr,
        )
    return distributed.plan_job(
        _model_path(args.model),
        source,
        store,
        model=model,
        series=args.series,
        channel_axis={None: "auto", "none": None}.get(args.channel_axis, args.channel_axis),
        block=block,
        threshold=args.threshold,
        min_size=args.min_size,
        probabilities=bool(args.probabilities),
        tile=positive_or_auto("--tile", args.tile),
        batch=positive_or_auto("--batch", args.batch),
        device=args.device,
        precision=args.precision,
    )


def _check_store_path(path: Path, inputs) -> None:
    """A store's folder may exist (a rerun resumes it; the core checks whose it is)."""
    import os

    if path.exists() and not path.is_dir():
        raise UsageError(f"--output: {path} is a file; expected a .zarr store (a folder)")
    for source in inputs:
        if path.exists() and os.path.samefile(path, source):
            raise UsageError(f"--output: {path} is one of this run's inputs; choose another output")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise UsageError(f"--output: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--output: folder {folder} is not writable")


def _segment_in_blocks(args, outputs, model, axes: str) -> int:
    """A TIFF output of huge planes: the block-wise path of ``-o OUT.zarr`` run in this
    process into a temporary store, then tiled TIFFs written from it tile by tile."""
    import os
    import shutil

    from .core import distributed
    from .core.io import write_tiff_tiled
    from .core.postprocess import labels_dtype

    option = _whole_plane_option(args)
    if option:
        raise UsageError(
            f"{option}: not available for planes over {HUGE_PLANE_PIXELS // 2**20} Mpx "
            f"(segmented block by block to bound memory)"
        )
    store = outputs[0].with_name(f".{outputs[0].name}.{os.getpid()}.partial.zarr")
    job = _block_job(args, args.input, store, model, distributed.DEFAULT_BLOCK)
    stop, executor = _StopFlag(), distributed.InProcess()
    try:
        with stop.installed():
            events = distributed.segment_on_cluster(job, executor, overwrite=True, should_stop=stop)
            last = _drain_cluster(events, args.quiet)
            if last.stopped:
                print("tiled-unet segment: stopped; no output was written", file=sys.stderr)
                return stop.exit_code
        arrays = distributed.open_store(store)
        tile = job.block
        targets = [(outputs[0], arrays["labels"], labels_dtype(last.objects), axes, True, tile)]
        if args.probabilities:
            targets.append((outputs[1], arrays["probabilities"], np.float32, axes, False, tile))
        write_tiff_tiled(targets, overwrite=args.overwrite)
    finally:
        executor.close()
        shutil.rmtree(store, ignore_errors=True)
    print(
        f"{args.output}: {last.objects} objects in {int(np.prod(job.leading, dtype=np.int64))} "
        f"plane(s) (planes over {HUGE_PLANE_PIXELS // 2**20} Mpx: segmented in blocks; ids "
        f"unique in the file)"
    )
    return 0


def _whole_plane_option(args) -> str | None:
    """The first option given that needs whole planes in memory (the block-wise paths refuse it)."""
    given = {
        "--diameter": args.diameter is not None,
        "--split": bool(args.split),
        "--min-peak": bool(args.min_peak),
        "--link-z": args.link_z is not None,
        "--measure": args.measure,
    }
    return next((option for option, on in given.items() if on), None)


def _refuse_for_zarr(args) -> None:
    if len(args.input) != 1 or args.input[0].is_dir():
        raise UsageError("input: a .zarr output takes one input image")
    option = _whole_plane_option(args)
    if option:
        raise UsageError(f"{option}: not available with a .zarr output; write a TIFF")
    if args.probabilities not in (None, True):
        raise UsageError(
            "--probabilities: with a .zarr output they are stored in it; pass the "
            "flag without a path"
        )


def _as_option(message: str) -> str:
    option = {
        "block": "--block",
        "output": "--output",
        "input": "input",
        "model": "--model",
        "channel_axis": "--channel-axis",
        "tile": "--tile",
        "batch": "--batch",
    }
    name, _, rest = message.partition(": ")
    return f"{option[name]}: {rest}" if name in option and rest else message


@contextlib.contextmanager
def _dask_client(args):
    """A client of the scheduler asked for, or of a new local cluster (closed afterwards)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError(
            "--cluster: needs dask.distributed: pip install 'napari-tiled-unet[cluster]'"
        ) from None
    if args.scheduler:
        try:
            client = Client(args.scheduler, timeout=_CONNECT_TIMEOUT_S)
        except (OSError, ValueError, TimeoutError) as error:
            raise UsageError(f"--scheduler: cannot reach {args.scheduler} ({error})") from None
        with client:
            yield client
        return
    workers = _local_workers(args.cluster or "local:1")
    import os

    threads = max(1, (os.cpu_count() or 1) // workers)
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            env={"OMP_NUM_THREADS": str(threads)},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _local_workers(text: str) -> int:
    kind, _, count = text.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise UsageError(f"--cluster: expected local:N with N a positive integer, got {text!r}")
    return int(count)


def _drain_cluster(events, quiet):
    from tqdm import tqdm

    bar, last = None, None
    try:
        for last in events:
            if quiet:
                continue
            if bar is None:
                bar = tqdm(total=last.total, initial=last.done, unit="block", file=sys.stderr)
            bar.n = last.done
            stage = {"blocks": "predicting", "merge": "merging labels"}.get(last.stage, last.stage)
            bar.set_postfix_str(stage, refresh=True)
    finally:
        if bar is not None:
            bar.close()
    return last


def _segment_jobs(args) -> list:
    """One namespace per input file: ``input`` and ``output`` set."""
    from argparse import Namespace

    from .core.batch import batch_pairs

    if len(args.input) == 1 and not args.input[0].is_dir():
        return [Namespace(**{**vars(args), "input": args.input[0]})]
    try:
        pairs = batch_pairs(args.input, args.output)
    except ValueError as error:
        raise UsageError(str(error).replace("output: ", "--output: ", 1)) from None
    if args.probabilities:
        raise UsageError("--probabilities: write probabilities one input at a time")
    args.output.mkdir(parents=True, exist_ok=True)
    return [Namespace(**{**vars(args), "input": f, "output": out}) for f, out in pairs]


def _channel_axis_arg(text: str) -> int | str:
    if text.strip().lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an axis number or none, got {text!r}") from None


def _fitted(image, args, in_channels: int):
    """The image with the channel axis this run uses, and what to tell the user: the one
    colour rule of :mod:`core.channels` unless ``--channel-axis`` chose."""
    from dataclasses import replace

    from .core.channels import fit_colours

    if args.channel_axis == "none":
        return replace(image, channel_axis=None), None
    if args.channel_axis is not None:
        return replace(image, channel_axis=args.channel_axis), None
    return fit_colours(image, in_channels)


def _plane_axes(image) -> str:
    from .core.shapes import without_channel

    try:
        return "".join(without_channel(image.axes, image.channel_axis))
    except ValueError as error:
        raise UsageError(f"--{str(error).replace('_', '-')}") from None


def _segment_file(args, image, outputs, model) -> int:
    from .core.batch import FileOutputs, segment_file
    from .core.io import IncompleteWrite
    from .core.predict import positive_or_auto
    from .core.shapes import output_shape

    shape = output_shape(image.shape, image.channel_axis)
    if shape[-2] * shape[-1] > HUGE_PLANE_PIXELS:
        return _segment_in_blocks(args, outputs, model, _plane_axes(image))
    stop = _StopFlag()
    targets = FileOutputs(
        outputs[0], args.probabilities or None, outputs[-1] if args.measure else None
    )
    events = segment_file(
        model,
        image,
        targets,
        channel_axis=image.channel_axis,
        link_z=args.link_z,
        overwrite=args.overwrite,
        should_stop=stop,
        threshold=args.threshold,
        min_size=args.min_size,
        split=args.split,
        min_peak=args.min_peak,
        tile=positive_or_auto("--tile", args.tile),
        batch=positive_or_auto("--batch", args.batch),
        device=args.device,
        precision=args.precision,
        diameter=args.diameter,
    )
    try:
        with stop.installed():
            last = _drain_file(events, args.quiet)
    except (IncompleteWrite, KeyboardInterrupt):
        last = None
    if last is None or last.stopped:
        print("tiled-unet segment: stopped; no output was written", file=sys.stderr)
        return stop.exit_code
    if last.linked is not None:
        print(
            f"{args.output}: {last.linked} objects linked across {last.planes} plane(s) "
            f"({last.objects} in the planes)"
        )
    else:
        print(
            f"{args.output}: {last.objects} objects in {last.planes} plane(s)"
            f"{' (ids restart at 1 in each plane)' if last.planes > 1 else ''}"
        )
    return 0


# Planes larger than this (8192 x 8192) are segmented block by block through a temporary store
# beside the output, so memory stays bounded by a block (a whole-slide scan is one plane).
HUGE_PLANE_PIXELS = 1 << 26
_CONNECT_TIMEOUT_S = 5


def _checked_outputs(args) -> list[Path]:
    """The TIFF outputs, then the measurements CSV when asked for; all checked before work."""
    from .core.batch import TIFF_SUFFIXES, check_output_path

    outputs = [args.output] + ([args.probabilities] if args.probabilities else [])
    inputs = [args.input, _model_path(args.model)]
    for option, path in zip(("--output", "--probabilities"), outputs):
        check_output_path(option, path, inputs, args.overwrite, TIFF_SUFFIXES)
    if args.measure:
        check_output_path("--measure", args.output.with_suffix(".csv"), inputs, args.overwrite)
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise UsageError("--probabilities: must differ from --output")
    return outputs + ([args.output.with_suffix(".csv")] if args.measure else [])


def _model_path(path: Path | None) -> Path:
    if path is not None:
        return path
    if not DEFAULT_MODEL.is_file():
        raise UsageError("--model: no bundled default model is installed; pass a model file")
    return DEFAULT_MODEL


def _z_linker(min_iou, axes: str):
    from .core.batch import z_linker

    try:
        return z_linker(min_iou, axes)
    except ValueError as error:
        raise UsageError(f"--link-z: {str(error).split(': ', 1)[1]}") from None


def _diameter(text: str):
    if text.strip() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of pixels or 'auto', got {text!r}"
        )
    return value


def _drain_file(events, quiet):
    """Drain the file step with a progress bar; the last event."""
    bar, last, told = _ProgressBar(quiet), None, False
    try:
        for last in events:
            step = last.step
            if not told and step.diameter is not None:
                told = True
                print(
                    f"tiled-unet segment: object diameter {step.diameter:.1f} px; planes "
                    f"segmented at {step.factor:.3g}x",
                    file=sys.stderr,
                )
            bar.update(step)
    finally:
        bar.close()
    return last


class _ProgressBar:
    """Tiles done, with the plane count; no rate until the first batch is timed."""

    def __init__(self, quiet):
        self.quiet = quiet
        self.bar = None

    def update(self, event):
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            # the first batch arrives all at once: counting it would show a huge first rate
            self.bar = tqdm(total=event.total, initial=event.done, unit="tile", file=sys.stderr)
        self.bar.total = event.total
        self.bar.n = event.done
        self.bar.set_postfix_str(f"plane {event.planes_done}/{event.planes_total}", refresh=True)

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

    def _request(self, signum, *_):
        self.requested = True
        self.signal = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for death by the signal received: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(getattr(self, "signal", signal.SIGINT))


def _add_train_parser(commands):
    train = commands.add_parser(
        "train",
        help="train a model from images and instance label images",
        description="Train a U-Net with the border-weighted loss. Label 0 is background; with "
        "--regions, only inside the region (nonzero) and ignored outside it.",
    )
    train.add_argument("--images", type=Path, nargs="+", required=True, help="image TIFFs")
    train.add_argument(
        "--labels",
        type=Path,
        nargs="+",
        required=True,
        help="instance label TIFFs, one per image (same shape)",
    )
    train.add_argument("--regions", type=Path, nargs="+", help="masks of fully annotated regions")
    train.add_argument("--ignore-label", type=int, help="label id to ignore")
    train.add_argument("-o", "--output", type=Path, required=True, help="model file to write")
    train.add_argument(
        "--iterations",
        type=int,
        help=f"default: {SCRATCH.iterations} from scratch, {FINE_TUNE.iterations} fine-tuning "
        f"(--init)",
    )
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--patch", type=int, default=252, help="input patch size (px)")
    train.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default: {SCRATCH.lr:g} from scratch, {FINE_TUNE.lr:g} fine-tuning)",
    )
    train.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="adam, or the paper's SGD with momentum 0.99",
    )
    train.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help=f"learning rate over the run (cosine: decays to 0 at the last iteration; default: "
        f"{SCRATCH.lr_schedule} from scratch, {FINE_TUNE.lr_schedule} fine-tuning)",
    )
    train.add_argument(
        "--anchor",
        type=float,
        help=f"fine-tuning: weight of the pull toward the --init weights (L2-SP; default "
        f"{FINE_TUNE.anchor:g}, 0: none)",
    )
    train.add_argument(
        "--depth", type=int, help=f"from scratch (default {SCRATCH_ARCHITECTURE.depth})"
    )
    train.add_argument(
        "--base-channels",
        type=int,
        help=f"from scratch (default {SCRATCH_ARCHITECTURE.base_channels})",
    )
    train.add_argument(
        "--mode",
        choices=tuple(MODE_CHANNELS),
        help="output: paper (background / foreground, touching objects split by a "
        "gap; the default from scratch), boundary (background / interior / boundary, split by "
        "watershed from the interiors) or distance (foreground and a distance map, split "
        "by watershed from the distance peaks). With --init: that model's mode by default; "
        "another mode keeps its network and rebuilds its output layer",
    )
    train.add_argument(
        "--zoom",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=(0.5, 2.0),
        help="scale augmentation range: objects appear LOW to HIGH times their "
        "size (default 0.5 2; 1 1 turns it off)",
    )
    train.add_argument(
        "--norm",
        choices=("none", "batch"),
        help="from scratch: normalisation layer after each convolution (default "
        f"{SCRATCH_ARCHITECTURE.norm or 'none'}; none is the paper's)",
    )
    train.add_argument(
        "--weights",
        choices=("paper", "fiji"),
        default="paper",
        help="border weights: paper (w0 10, sigma 5) or fiji (w0 50, sigma 6)",
    )
    train.add_argument("--w0", type=float, help="separation weight (default by --weights)")
    train.add_argument("--sigma", type=float, help="separation width (default by --weights)")
    train.add_argument("--pixel-size", type=float, help="pixel size; --sigma is then physical")
    train.add_argument("--val-fraction", type=float, default=0.1)
    train.add_argument(
        "--val-split",
        choices=("auto", "image", "plane"),
        default="auto",
        help="hold out whole images or planes (auto: images when several)",
    )
    train.add_argument(
        "--validate-every",
        type=int,
        help=f"default: {SCRATCH.validate_every} from scratch, {FINE_TUNE.validate_every} "
        f"fine-tuning",
    )
    train.add_argument("--init", type=Path, help="model file to fine-tune from")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped run into the same output from its checkpoint",
    )
    train.add_argument("--device", default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true", help="replace an existing output")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)


def _train(args) -> int:
    from dataclasses import replace

    from .core.augment import Augmentation
    from .core.batch import check_output_path
    from .core.model import UNetConfig
    from .core.presets import preset_for
    from .core.train import TrainConfig, resumes_fine_tuning, train

    check_output_path(
        "--output",
        args.output,
        [*args.images, *args.labels, *(args.regions or []), args.init],
        args.overwrite or args.resume,
    )
    if args.resume and args.init:
        raise UsageError("--resume: continues the run writing --output; do not combine with --init")
    _check_architecture_options(args)
    samples = _training_samples(args)
    # a resumed fine-tuning run goes on with the fine-tuning defaults it started with
    preset = preset_for(args.init is not None or (args.resume and resumes_fine_tuning(args.output)))
    config = TrainConfig(
        iterations=_given(args.iterations, preset.iterations),
        batch=args.batch,
        patch=args.patch,
        lr=_given(args.lr, preset.lr),
        optimizer=args.optimizer,
        lr_schedule=_given(args.lr_schedule, preset.lr_schedule),
        weights=args.weights,
        w0=args.w0,
        sigma=args.sigma,
        pixel_size=args.pixel_size,
        ignore_label=args.ignore_label,
        val_fraction=args.val_fraction,
        val_split=args.val_split,
        validate_every=_given(args.validate_every, preset.validate_every),
        anchor=_given(args.anchor, preset.anchor),
        seed=args.seed,
        device=args.device,
        augmentation=replace(Augmentation(), zoom=_zoom_range(args.zoom)),
    )
    model_config = (
        None
        if (args.init or args.resume)
        else UNetConfig(
            depth=_given(args.depth, SCRATCH_ARCHITECTURE.depth),
            base_channels=_given(args.base_channels, SCRATCH_ARCHITECTURE.base_channels),
            norm={None: SCRATCH_ARCHITECTURE.norm, "none": None, "batch": "batch"}[args.norm],
            in_channels=_channels(samples[0]),
        ).with_mode(args.mode or "paper")
    )
    stop = _StopFlag()
    events = train(
        samples,
        args.output,
        config=config,
        model_config=model_config,
        init=args.init,
        mode=args.mode if args.init else None,
        resume=args.resume,
        should_stop=stop,
    )
    last, told = None, False
    with stop.installed(), _TrainBar(args.quiet, args.iterations) as bar:
        for last in events:
            if last.data is not None and not told:
                told = True
                print(f"tiled-unet train: {last.data.describe()}", file=sys.stderr)
            bar.update(last)
    best = last.best or {}
    if last.kept_start:
        print(
            f"tiled-unet train: warning: fine-tuning did not beat {_start_name(args)} on the "
            f"validation data (AP@0.5 {best['ap50']:.3f}, pixel IoU {best['iou']:.3f}; it takes "
            f"{last.beats_start}); {args.output} holds that starting model",
            file=sys.stderr,
        )
    status = "stopped" if last.stopped else "done"
    print(
        f"{status} after {last.iteration} iterations in {last.seconds:.0f} s; best validation "
        f"AP@0.5 {best.get('ap50', float('nan')):.3f}, pixel IoU {best.get('iou', float('nan')):.3f} "
        f"(iteration {best.get('iteration', '-')}); model: {args.output}"
    )
    return 0


def _start_name(args) -> str:
    """What a fine-tuning run started from, as its warning names it."""
    from .core.train import rebuilt_start_name

    if args.resume:
        return "its starting model"
    remedy = "more --iterations or a higher --lr"
    return rebuilt_start_name(args.init, args.mode, remedy) or str(args.init)


def _check_architecture_options(args) -> None:
    """The network of a fine-tuning run is --init's (only its outputs, --mode, can change); a
    resumed run's is its checkpoint's, outputs included: options that say otherwise are
    refused, not ignored."""
    given = [
        ("--depth", args.depth),
        ("--base-channels", args.base_channels),
        ("--norm", args.norm),
    ]
    if args.init:
        for option, value in given:
            if value is not None:
                raise UsageError(
                    f"{option}: the network comes from --init ({args.init}); expected no "
                    f"{option} with --init, got {value}"
                )
    elif args.resume:
        _check_resumed_architecture(args, [*given, ("--mode", args.mode)])


def _check_resumed_architecture(args, given) -> None:
    from .core.train import checkpoint_config

    config = checkpoint_config(args.output)
    if config is None:  # nothing to resume: train() says so
        return
    held = {
        "--depth": config.depth,
        "--base-channels": config.base_channels,
        "--norm": config.norm or "none",
        "--mode": config.output_mode,
    }
    for option, value in given:
        if value is not None and value != held[option]:
            raise UsageError(
                f"{option}: the run being resumed ({args.output}) has {held[option]}; expected "
                f"{held[option]} or no {option} with --resume, got {value}"
            )


def _given(value, default):
    return default if value is None else value


def _zoom_range(values) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    if not (0 < low <= high < float("inf")):
        raise UsageError(f"--zoom: expected 0 < LOW <= HIGH, got {low} {high}")
    return low, high


def _training_samples(args):
    from .core.io import read_tiff
    from .core.train import Sample

    if len(args.labels) != len(args.images):
        raise UsageError(
            f"--labels: expected one per image ({len(args.images)}), got {len(args.labels)}"
        )
    if args.regions and len(args.regions) != len(args.images):
        raise UsageError(
            f"--regions: expected one per image ({len(args.images)}), got {len(args.regions)}"
        )
    regions = args.regions or [None] * len(args.images)
    samples = []
    for image_path, labels_path, region_path in zip(args.images, args.labels, regions):
        image = read_tiff(image_path, name="--images")
        labels = np.asarray(read_tiff(labels_path, name="--labels").data)
        region = (
            None
            if region_path is None
            else np.asarray(read_tiff(region_path, name="--regions").data) != 0
        )
        samples.append(Sample(np.asarray(image.data), labels, region, image.channel_axis))
    return samples


def _channels(sample) -> int:
    return 1 if sample.channel_axis is None else sample.image.shape[sample.channel_axis]


class _TrainBar:
    def __init__(self, quiet, total):
        self.quiet, self.total, self.bar = quiet, total, None

    def __enter__(self):
        if not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="it", file=sys.stderr)
        return self

    def update(self, event):
        if self.bar is None:
            return
        self.bar.n = event.iteration
        shown = {"loss": f"{event.loss:.4f}"}
        if event.best:
            shown.update(val_ap50=f"{event.best['ap50']:.3f}", val_iou=f"{event.best['iou']:.3f}")
        self.bar.set_postfix(shown, refresh=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _add_tune_parser(commands):
    tune = commands.add_parser(
        "tune",
        help="choose a model's threshold, minimum object size and neck split on annotated images",
        description="Segment the annotated images, find the threshold, minimum object size and "
        "neck split with the best mean AP@0.5, and store them in the model file as its "
        "recommendation (used by segment and the Segment widget unless overridden). "
        "Use images the model was not trained on, or its training images; not the "
        "images you will report accuracy on.",
    )
    tune.add_argument("model", type=Path, help="model file to update (in place, atomically)")
    tune.add_argument("--images", type=Path, nargs="+", required=True)
    tune.add_argument("--labels", type=Path, nargs="+", required=True)
    tune.add_argument("--device", default="auto")
    tune.set_defaults(regions=None)  # read like training data, without regions
    return tune


def _tune(args) -> int:
    from .core.modelfile import load_model, save_model
    from .core.postprocess import choose_postprocess
    from .core.predict import predict_array
    from .core.targets import engine_output

    samples = _training_samples(args)
    model = load_model(args.model)
    probabilities, truths = [], []
    for sample, labels_path in zip(samples, args.labels):
        output = engine_output(model.config)
        maps = predict_array(
            model, sample.image, channel_axis=sample.channel_axis, device=args.device, output=output
        )
        shape = maps.shape if output == "foreground" else maps.shape[:-3] + maps.shape[-2:]
        if shape != sample.labels.shape:
            raise UsageError(
                f"--labels: {labels_path} has shape {sample.labels.shape}, expected {shape}"
            )
        plane_shape = sample.labels.shape[-2:]
        probabilities += list(maps.reshape((-1,) + maps.shape[-3 if output == "classes" else -2 :]))
        truths += list(sample.labels.reshape((-1,) + plane_shape))
    chosen = choose_postprocess(probabilities, truths, mode=model.config.output_mode)
    save_model(model, args.model, metadata={**model.metadata, "postprocess": chosen})
    print(
        f"{args.model}: threshold {chosen['threshold']}, min size {chosen['min_size']} px, "
        f"split {chosen['split']} px, min peak {chosen['min_peak']} (mean AP@0.5 "
        f"{chosen['ap50']:.3f} on {chosen['planes']} planes)"
    )
    return 0


def _info(args) -> int:
    from .core.config import ConfigGeometry, UNetConfig
    from .core.modelfile import read_header, tensor_shapes

    header = read_header(args.model)  # never imports torch: info answers at once
    config = UNetConfig.from_dict(header["config"])
    geometry = ConfigGeometry(config)
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # batch-norm state
    parameters = sum(
        int(np.prod(shape))
        for name, shape in tensor_shapes(args.model).items()
        if not name.endswith(buffers)
    )
    print(f"model file:     {args.model} ({args.model.stat().st_size / 1e6:.1f} MB)")
    print(
        f"architecture:   U-Net depth {config.depth}, {config.base_channels} base channels, "
        f"{config.padding} padding, norm {config.norm}, {parameters:,} parameters"
    )
    print(
        f"channels:       {config.in_channels} in, {config.n_classes} out "
        f"({config.output_mode} mode)"
    )
    print(
        f"margin:         {geometry.margin} px (smallest input tile {geometry.legal_input_size(1)} px)"
    )
    print(f"normalization:  {header['normalization']}")
    for key, value in header["metadata"].items():
        print(f"{key + ':':<15} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
