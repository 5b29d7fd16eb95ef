"""Segment a stack across a Dask cluster into OME-Zarr: block-wise, exact, resumable.

Dask (``dask.distributed``) schedules; we only cut the work into blocks. Each block task
predicts one output chunk of one plane with the overlap-tile engine (reading the block plus
the model's context, mirrored at the image's own borders only, so the probabilities equal a
whole-image pass), labels its foreground and records itself as done in the store. Object ids
are then made global the way dask-image merges block labels: ids that touch across block faces
are joined (connected components of the label adjacency graph, scipy.sparse.csgraph), objects
smaller than ``min_size`` are dropped by their merged size, and every block is rewritten with
its final ids, one task per block.

Output layout (OME-NGFF 0.4, zarr format 2; napari opens it with this plugin's reader or
napari-ome-zarr)::

    OUT.zarr/                    image group: the foreground probabilities when asked for
    OUT.zarr/0                   float32 (*leading, Y, X)   [optional]
    OUT.zarr/labels/segmentation/0   uint32 (*leading, Y, X), ids unique in the whole stack
    OUT.zarr/.work/              the run record, done markers and per-block labels (removed
                                 when the run completes)

Rerunning the same command resumes: blocks with a done marker are skipped. A marker is written
(atomically) only after the block's data, so nothing half-written is ever marked done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np

RECORD = "napari-tiled-unet"
LABELS_NAME = "segmentation"
DEFAULT_BLOCK = 1024
_WORK = ".work"


@dataclass(frozen=True)
class ClusterJob:
    """Everything a worker needs for a block: small, picklable, and the run's identity (a rerun
    with an equal job resumes).

    Attributes
    ----------
    model, input, output : str
        Model file, input TIFF or zarr, output store (absolute paths, visible to every worker).
    series : int or None
        TIFF series.
    channel_axis : int or None
        Channel axis of the input.
    shape : tuple of int
        Output shape (*leading, Y, X).
    axes : str
        Output axis letters (the input's, channel axis removed), e.g. "ZYX".
    block : (int, int)
        Output block (= chunk) size (Y, X).
    threshold : float
    min_size : int
    probabilities : bool
        Also store the foreground probabilities.
    tile, batch, device, precision
        Engine settings (:func:`~.predict.predict`).
    model_stamp : str
        The model file's size and modification time: a changed model does not resume.
    grey_axis : int or None
        The input's colour axis when its colours are averaged to grey for a one-channel model
        (:func:`~.channels.fit_colours`); ``channel_axis`` is then None.
    """

    model: str
    input: str
    output: str
    series: int | None
    channel_axis: int | None
    shape: tuple[int, ...]
    axes: str
    block: tuple[int, int]
    threshold: float
    min_size: int
    probabilities: bool
    tile: int | str = "auto"
    batch: int | str = "auto"
    device: str = "auto"
    precision: str = "auto"
    model_stamp: str = ""
    grey_axis: int | None = None

    @property
    def leading(self) -> tuple[int, ...]:
        return tuple(self.shape[:-2])

    @property
    def chunks(self) -> tuple[int, ...]:
        return (1,) * len(self.leading) + tuple(self.block)

    def record(self) -> dict:
        values = asdict(self)
        values["shape"], values["block"] = list(self.shape), list(self.block)
        return values

    def blocks(self) -> list[Block]:
        """Every block, in C order of (plane, block row, block column)."""
        height, width = self.shape[-2:]
        by, bx = self.block
        return [
            Block(lead, (slice(y, min(y + by, height)), slice(x, min(x + bx, width))))
            for lead in np.ndindex(*self.leading)
            for y, x in product(range(0, height, by), range(0, width, bx))
        ]


@dataclass(frozen=True)
class Block:
    """One output block: a plane (``lead``) and a (Y, X) box aligned to the chunk grid."""

    lead: tuple[int, ...]
    box: tuple[slice, slice]

    @property
    def name(self) -> str:
        return "_".join(map(str, (*self.lead, self.box[0].start, self.box[1].start)))


@dataclass(frozen=True)
class ClusterEvent:
    """Progress of :func:`segment_on_cluster`.

    Attributes
    ----------
    stage : {"blocks", "merge", "done"}
    done, total : int
        Blocks finished (skipped ones included) and blocks in all.
    skipped : int
        Blocks a previous run had finished.
    objects : int or None
        Objects in the stack, once merged.
    stopped : bool
        True on the last event when ``should_stop`` ended the run (rerun to resume).
    """

    stage: str
    done: int
    total: int
    skipped: int = 0
    objects: int | None = None
    stopped: bool = False


def plan_job(
    model_path,
    input_path,
    output,
    *,
    model,
    series=None,
    channel_axis: int | str | None = "auto",
    block: int | tuple[int, int] = DEFAULT_BLOCK,
    threshold=None,
    min_size=None,
    probabilities: bool = False,
    tile="auto",
    batch="auto",
    device="auto",
    precision="auto",
) -> ClusterJob:
    """Check every argument and build the job, before any work.

    Parameters
    ----------
    model_path, input_path, output : str or Path
    model : UNet
        The loaded model (checked: 2 classes; block size against its geometry).
    channel_axis : int, "auto" or None
        The input's channel axis; "auto": the one its metadata gives, with colours averaged to
        grey for a one-channel model (:func:`~.channels.fit_colours`); None: no channel axis.

    Raises
    ------
    ValueError
        Naming the parameter, what was expected and what was given.
    """
    from .channels import GreyView, fit_colours
    from .io import open_image
    from .postprocess import postprocess_options
    from .predict import _check_channels
    from .shapes import leading_shape, normalised_axis, without_channel

    if model.config.output_mode != "paper":
        raise ValueError(
            f"model: the cluster path labels 2-class (foreground) models; this one "
            f"has {model.config.n_classes} outputs ({model.config.output_mode} mode)"
        )
    # blocks are labelled as connected components: a neck split, and a floor on an object's
    # highest probability, need whole objects
    threshold, min_size, _, _ = postprocess_options(
        model.metadata, threshold, min_size, split=0, min_peak=0.0
    )
    image = open_image(input_path, series=series)
    grey_axis = None
    if channel_axis == "auto":
        fitted, _ = fit_colours(image, model.config.in_channels)
        if isinstance(fitted.data, GreyView):
            grey_axis, image = image.channel_axis, fitted
        channel_axis = image.channel_axis
    if isinstance(channel_axis, str):
        raise ValueError(
            f"channel_axis: expected an axis number, 'auto' or None, got {channel_axis!r}"
        )
    channel_axis = normalised_axis(channel_axis, len(image.shape))
    _check_channels(model, image.data, channel_axis)
    axes = "".join(without_channel(image.axes, channel_axis))
    block = _checked_block(block, model)
    output = Path(output).absolute()
    if output.suffix.lower() != ".zarr":
        raise ValueError(f"output: expected a store name ending in .zarr, got {output}")
    stamp = Path(model_path).stat()
    return ClusterJob(
        str(Path(model_path).absolute()),
        str(Path(input_path).absolute()),
        str(output),
        series,
        channel_axis,
        leading_shape(image.shape, channel_axis) + tuple(image.shape[-2:]),
        axes,
        block,
        float(threshold),
        int(min_size),
        bool(probabilities),
        tile,
        batch,
        device,
        precision,
        f"{stamp.st_size}:{stamp.st_mtime_ns}",
        grey_axis,
    )


def _checked_block(block, model) -> tuple[int, int]:
    from .predict import smallest_tile

    sizes = block if isinstance(block, tuple) else (block, block)
    smallest, step = smallest_tile(model), model.size_step
    if len(sizes) != 2 or not all(
        isinstance(n, (int, np.integer))
        and not isinstance(n, bool)
        and n >= smallest
        and n % step == 0
        for n in sizes
    ):
        raise ValueError(
            f"block: expected a size in px of at least {smallest} (this model's "
            f"smallest tile) and a multiple of {step}, got {block!r}"
        )
    return int(sizes[0]), int(sizes[1])


def prepare_store(job: ClusterJob, overwrite: bool = False) -> int:
    """Create the output store for ``job``, or find the one a previous run of the same job left.

    Returns
    -------
    int
        Blocks already done (0 for a new store).

    Raises
    ------
    ValueError
        The output exists and is not this job's (without ``overwrite``), or is not a store this
        plugin wrote (never removed, even with ``overwrite``).
    """
    output = Path(job.output)
    if output.exists():
        previous = _read_record(output)
        if previous is None:
            raise ValueError(
                f"output: {output} exists and is not a napari-tiled-unet store; "
                f"choose another name or remove it yourself"
            )
        if previous == job.record() and not overwrite:
            return (
                len(list(_done_folder(output).glob("*.npz")))
                if not _complete(output)
                else len(job.blocks())
            )
        if not overwrite:
            raise ValueError(
                f"output: {output} holds another run's result; pass --overwrite to "
                f"replace it, or rerun that run's exact command to resume it"
            )
        shutil.rmtree(output)
    if not output.parent.is_dir():
        raise ValueError(f"output: folder {output.parent} does not exist")
    _create_store(job)
    return 0


def _create_store(job: ClusterJob) -> None:
    """Build the empty store under a temporary name, then rename it into place: a crash while
    creating it never leaves a half-made store at the output's name."""
    output = Path(job.output)
    building = output.with_name(f".{output.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        _build_store(job, building)
        os.rename(building, output)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _build_store(job: ClusterJob, where: Path) -> None:
    import zarr

    root = zarr.open_group(str(where), mode="w", zarr_format=2)
    axes = _ngff_axes(job.axes)
    if job.probabilities:
        root.create_array("0", shape=job.shape, chunks=job.chunks, dtype="float32", fill_value=0)
        root.attrs["multiscales"] = [_multiscale("probabilities", axes)]
    labels = root.create_group("labels")
    labels.attrs["labels"] = [LABELS_NAME]
    image = labels.create_group(LABELS_NAME)
    image.create_array("0", shape=job.shape, chunks=job.chunks, dtype="uint32", fill_value=0)
    image.attrs["multiscales"] = [_multiscale(LABELS_NAME, axes)]
    image.attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
    work = root.create_group(_WORK)
    work.create_array("local", shape=job.shape, chunks=job.chunks, dtype="uint32", fill_value=0)
    _done_folder(where).mkdir()
    root.attrs[RECORD] = {"job": job.record(), "complete": False}


def _ngff_axes(axes: str) -> list[dict]:
    """NGFF axes for the output's axis letters (the input's, channel axis removed)."""
    kinds = {"T": "time", "Z": "space", "Y": "space", "X": "space"}
    return [{"name": a.lower(), "type": kinds.get(a, "custom")} for a in axes]


def _multiscale(name: str, axes: list[dict]) -> dict:
    return {
        "version": "0.4",
        "name": name,
        "axes": axes,
        "datasets": [
            {
                "path": "0",
                "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(axes)}],
            }
        ],
    }


def _store_record(output: Path) -> dict:
    """This plugin's record in a store's attributes ({} for anything else)."""
    try:
        record = json.loads((output / ".zattrs").read_text())[RECORD]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_record(output: Path) -> dict | None:
    return _store_record(output).get("job")


def _complete(output: Path) -> bool:
    return bool(_store_record(output).get("complete"))


def _done_folder(output: Path) -> Path:
    return output / _WORK / "done"


def segment_on_cluster(
    job: ClusterJob,
    client,
    *,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[ClusterEvent]:
    """Run ``job`` on the Dask cluster of ``client``; a generator of :class:`ClusterEvent`.

    The store is prepared (created, or found for resuming) when this is called, before any
    work. Blocks run as tasks (one per output chunk; Dask retries those of a worker that dies);
    the merge runs as tasks on the same cluster (one per plane, then one per block).

    Parameters
    ----------
    job : ClusterJob
        From :func:`plan_job`.
    client : distributed.Client
    overwrite : bool
        Replace an output that holds another run's result.
    should_stop : callable, optional
        Polled as blocks finish; a stop cancels the rest and leaves a resumable store.
    """
    skipped = prepare_store(job, overwrite)
    return _run(job, client, skipped, should_stop or (lambda: False))


def _run(job, client, skipped, should_stop) -> Iterator[ClusterEvent]:
    blocks, output = job.blocks(), Path(job.output)
    total = len(blocks)
    if _complete(output):
        yield ClusterEvent(
            "done", total, total, skipped=total, objects=_store_record(output).get("objects")
        )
        return
    done_names = {p.stem for p in _done_folder(output).glob("*.npz")}
    todo = [b for b in blocks if b.name not in done_names]
    done = total - len(todo)
    yield ClusterEvent("blocks", done, total, skipped=done)
    run = uuid.uuid4().hex[:8]  # task names of this run (a cancelled run's may linger)
    stats = {
        lead: client.submit(_plane_stats, job, lead, key=f"stats-{'_'.join(map(str, lead))}-{run}")
        for lead in dict.fromkeys(b.lead for b in todo)
    }
    futures = [
        client.submit(_block_task, job, b, stats[b.lead], key=f"block-{b.name}-{run}") for b in todo
    ]
    finished = _as_completed(client, futures)
    for future in finished:
        future.result()  # a block that failed on every retry raises here
        done += 1
        if should_stop():
            _cancel_and_settle(client, futures + list(stats.values()))
            yield ClusterEvent("blocks", done, total, skipped=skipped, stopped=True)
            return
        yield ClusterEvent("blocks", done, total, skipped=skipped)
    yield ClusterEvent("merge", done, total, skipped=skipped)
    objects = _merge(job, client)
    yield ClusterEvent("done", done, total, skipped=skipped, objects=objects)


class InProcess:
    """The part of a ``distributed.Client`` that :func:`segment_on_cluster` uses, run on
    threads of this process: block-wise segmentation of huge planes without a cluster (memory
    bounded by a block, everything else on disk)."""

    dashboard_link = None

    def __init__(self, workers: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="block")

    def submit(self, function, *args, key=None, pure=None):
        from concurrent.futures import Future

        # Futures given as arguments (a plane's statistics) are waited for, as Dask would.
        return self.pool.submit(
            lambda: function(*(a.result() if isinstance(a, Future) else a for a in args))
        )

    def gather(self, futures):
        return [future.result() for future in futures]

    def cancel(self, futures) -> None:
        for future in futures:
            future.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_SETTLE_SECONDS = 300


def _cancel_and_settle(client, futures) -> None:
    """Cancel the run's tasks and wait for those already running to end (a block runs to its
    end and records itself), so a stopped run leaves the store as the next run will find it."""
    client.cancel(futures)
    if isinstance(client, InProcess):
        from concurrent.futures import wait

        wait(futures, timeout=_SETTLE_SECONDS)
        return
    # A cancelled task that already runs goes on in its worker (the scheduler forgets it).
    deadline = time.monotonic() + _SETTLE_SECONDS
    while time.monotonic() < deadline and any(client.run(_executing).values()):
        time.sleep(0.1)


def _executing(dask_worker) -> int:
    return len(dask_worker.state.executing)


def _as_completed(client, futures):
    if isinstance(client, InProcess):
        from concurrent.futures import as_completed

        return as_completed(futures)
    from distributed import as_completed

    return as_completed(futures)


# ---- worker side -------------------------------------------------------------------------

_WORKER_CACHE: dict = {}


def _worker_model(job: ClusterJob):
    """The job's model, loaded once per worker process (tasks carry only its path)."""
    key = ("model", job.model, job.model_stamp)
    if key not in _WORKER_CACHE:
        from .modelfile import load_model

        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = load_model(job.model)
    return _WORKER_CACHE[key]


def _worker_image(job: ClusterJob):
    key = ("image", job.input, job.series, job.grey_axis)
    if key not in _WORKER_CACHE:
        from dataclasses import replace

        from .channels import GreyView
        from .io import open_image

        image = open_image(job.input, series=job.series)
        if job.grey_axis is not None:
            image = replace(image, data=GreyView(image.data, job.grey_axis), channel_axis=None)
        _WORKER_CACHE[key] = image
    return _WORKER_CACHE[key]


def _worker_device(device: str) -> str:
    """ "auto" on a worker: its GPU when it has one; workers of one machine share its GPUs by
    their names (a LocalCluster names them 0..N-1)."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return "cuda"
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else "cuda"


def _plane_stats(job: ClusterJob, lead: tuple[int, ...]):
    import dask

    from .io import release_mapped_pages
    from .predict import PlaneView

    model = _worker_model(job)
    norm = model.normalization
    data = _worker_image(job).data
    with dask.config.set(scheduler="synchronous"):
        stats = norm.plane_stats(PlaneView(data, lead, job.channel_axis))
    release_mapped_pages(data)
    return stats


class _KnownStats:
    """A normalisation whose plane statistics were computed once, for the whole plane, by
    another task (a block alone would see other percentiles and break exactness)."""

    def __init__(self, stats):
        self.stats = stats

    def plane_stats(self, plane):
        return self.stats


def _block_task(job: ClusterJob, block: Block, stats) -> int:
    """Predict, label and store one block; record it as done. Returns its object count."""
    import dask

    from .io import release_mapped_pages

    marker = _marker(job, block)
    if marker.exists():  # a retried task whose first run finished
        return int(np.load(marker)["count"])
    # A lazy input is read here, in this task: never as new tasks on the cluster.
    with dask.config.set(scheduler="synchronous"):
        local, probability, sizes = _segmented_block(job, block, stats)
    release_mapped_pages(
        _worker_image(job).data
    )  # a memmapped input's pages: not this worker's memory
    where = block.lead + block.box
    _store_array(job, f"{_WORK}/local")[where] = local
    if job.probabilities:
        _store_array(job, "0")[where] = probability
    # The record holds what the merge needs (sizes, border rows and columns), so the merge
    # never reads the blocks' labels back; written last and atomically: it marks the block done.
    _write_npz(
        marker,
        count=len(sizes),
        sizes=sizes,
        top=local[0],
        bottom=local[-1],
        left=local[:, 0],
        right=local[:, -1],
    )
    return len(sizes)


def _marker(job: ClusterJob, block: Block) -> Path:
    return _done_folder(Path(job.output)) / f"{block.name}.npz"


def _segmented_block(job: ClusterJob, block: Block, stats):
    """The block's probabilities, its local labels (1..n) and their sizes."""
    from scipy import ndimage

    from .predict import PlaneView, predict

    view = PlaneView(_worker_image(job).data, block.lead, job.channel_axis)
    probability = np.zeros(tuple(s.stop - s.start for s in block.box), np.float32)
    for _ in predict(
        _worker_model(job),
        view,
        probability,
        channel_axis=0,
        region=block.box,
        normalization=_KnownStats(stats),  # type: ignore[arg-type]  # plane_stats duck type
        tile=job.tile,
        batch=job.batch,
        device=_worker_device(job.device),
        precision=job.precision,
        compile=False,
    ):
        pass
    foreground = probability > job.threshold
    local = np.zeros(probability.shape, np.uint32)
    count = ndimage.label(foreground, structure=np.ones((3, 3), bool), output=local)
    sizes = np.bincount(local[foreground], minlength=count + 1)[1:]
    return local, probability, sizes


def _store_array(job: ClusterJob, path: str):
    import zarr

    return zarr.open_array(f"{job.output}/{path}", mode="r+", zarr_format=2)


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ---- merge -------------------------------------------------------------------------------


def _merge(job: ClusterJob, client) -> int:
    """Global ids, the way dask-image merges block labels: block ids offset to be unique, an
    adjacency graph of the ids that touch across block faces (8-connected, within a plane;
    one task per plane, from the recorded border strips), its connected components
    (scipy.sparse.csgraph), then objects under ``min_size`` dropped by their merged size,
    renumbered 1..N, and every block rewritten (one task each, with its slice of the table)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    blocks = job.blocks()
    counts, sizes = _block_counts(job, blocks)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    per_plane = len(blocks) // max(1, int(np.prod(job.leading, dtype=np.int64)))
    edges = client.gather(
        [
            client.submit(
                _plane_edges, job, blocks[i : i + per_plane], offsets[i : i + per_plane], pure=False
            )
            for i in range(0, len(blocks), per_plane)
        ]
    )
    pairs = np.concatenate([np.empty((2, 0), np.int64), *edges], axis=1)
    graph = coo_matrix(
        (np.ones(pairs.shape[1], np.int8), (pairs[0], pairs[1])), shape=(total + 1,) * 2
    )
    _, components = connected_components(graph, directed=False)
    merged_sizes = np.bincount(components, weights=np.concatenate([[0], sizes]))
    keep = merged_sizes >= max(job.min_size, 1)
    keep[components[0]] = False  # node 0 is the background
    renumber = np.zeros(len(merged_sizes), np.uint32)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    table = renumber[components]
    client.gather(
        [
            client.submit(
                _relabel_block,
                job,
                block,
                np.concatenate([[0], table[offsets[i] + 1 : offsets[i + 1] + 1]]),
                pure=False,
            )
            for i, block in enumerate(blocks)
        ]
    )
    objects = int(keep.sum())
    _finish(Path(job.output), objects)
    return objects


def _block_counts(job: ClusterJob, blocks) -> tuple[np.ndarray, np.ndarray]:
    """Object counts per block (C order) and every block object's size, in id order."""
    counts, sizes = [], []
    for block in blocks:
        with np.load(_marker(job, block)) as record:
            counts.append(int(record["count"]))
            sizes.append(record["sizes"])
    return np.asarray(counts, np.int64), np.concatenate([np.empty(0, np.int64), *sizes])


def _plane_edges(job: ClusterJob, blocks: list[Block], offsets: np.ndarray) -> np.ndarray:
    """Pairs of global ids (2, M) that touch across the block faces of one plane."""
    strips = {}
    for block, offset in zip(blocks, offsets):
        with np.load(_marker(job, block)) as record:
            strips[block.box[0].start, block.box[1].start] = {
                side: np.where(record[side] > 0, record[side].astype(np.int64) + offset, 0)
                for side in ("top", "bottom", "left", "right")
            }
    by, bx = job.block
    found = [np.empty((2, 0), np.int64)]
    for (y, x), strip in strips.items():
        right, below, corner = (
            strips.get((y, x + bx)),
            strips.get((y + by, x)),
            strips.get((y + by, x + bx)),
        )
        if right is not None:
            found.append(_face_pairs(strip["right"], right["left"]))
        if below is not None:
            found.append(_face_pairs(strip["bottom"], below["top"]))
        if corner is not None:  # 8-connectivity: the diagonal neighbour shares one corner
            found.append(_face_pairs(strip["bottom"][-1:], corner["top"][:1]))
        before = strips.get((y + by, x - bx))
        if before is not None:  # and the anti-diagonal one
            found.append(_face_pairs(strip["bottom"][:1], before["top"][-1:]))
    return np.unique(np.concatenate(found, axis=1), axis=1)


def _face_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Id pairs of 8-connected neighbours across a face: ``a[i]`` touches ``b[i-1..i+1]``."""
    pairs = [np.stack([a, b])]
    if len(a) > 1:
        pairs += [np.stack([a[1:], b[:-1]]), np.stack([a[:-1], b[1:]])]
    joined = np.concatenate(pairs, axis=1)
    return joined[:, (joined[0] > 0) & (joined[1] > 0)]


def _relabel_block(job: ClusterJob, block: Block, table: np.ndarray) -> None:
    """Write a block's final ids: ``table[local id]`` (``table`` covers this block's ids)."""
    where = block.lead + block.box
    local = np.asarray(_store_array(job, f"{_WORK}/local")[where])
    _store_array(job, f"labels/{LABELS_NAME}/0")[where] = table[local]


def _finish(output: Path, objects: int) -> None:
    import zarr

    root = zarr.open_group(str(output), mode="r+", zarr_format=2)
    record: dict = dict(root.attrs[RECORD])  # type: ignore[arg-type]  # our JSON object
    root.attrs[RECORD] = {**record, "complete": True, "objects": objects}
    shutil.rmtree(output / _WORK, ignore_errors=True)


def is_finished_store(path) -> bool:
    """True for a store this plugin wrote and finished."""
    path = Path(path)
    return _read_record(path) is not None and _complete(path)


def open_store(path) -> dict:
    """The arrays of a finished store, lazily: ``{"labels": dask array, "probabilities": dask
    array or None}``.

    Raises
    ------
    ValueError
        Not a store this plugin wrote, or not finished.
    """
    import dask.array as da
    import zarr

    path = Path(path)
    if _read_record(path) is None:
        raise ValueError(f"path: {path} is not a napari-tiled-unet store")
    if not _complete(path):
        raise ValueError(f"path: {path} is unfinished; rerun its command to complete it")
    root = zarr.open_group(str(path), mode="r", zarr_format=2)
    labels = da.from_zarr(root[f"labels/{LABELS_NAME}/0"])
    probabilities = da.from_zarr(root["0"]) if "0" in root else None
    return {"labels": labels, "probabilities": probabilities}
