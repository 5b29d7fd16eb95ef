"""Segment a stack across a Dask cluster into OME-Zarr: block-wise, exact, resumable.

Dask (``dask.distributed``) schedules; we only cut the work into blocks. Each block task
predicts one output chunk of one plane with the overlap-tile engine (reading the block plus
the model's context, mirrored at the image's own borders only, so the probabilities equal a
whole-image pass), labels its foreground and records itself as done in the store. Object ids
are then made global by dask-image's block merge: labels that touch across block faces are
joined (a connected-components pass over the label adjacency graph), objects smaller than
``min_size`` are dropped by their merged size, and the final ids are written chunk by chunk.

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
# Connectivity within a plane only: 8-connected in (Y, X), planes never join.
_PLANE_STRUCTURE = np.zeros((3, 3, 3), bool)
_PLANE_STRUCTURE[1] = True


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
        return [Block(lead, (slice(y, min(y + by, height)), slice(x, min(x + bx, width))))
                for lead in np.ndindex(*self.leading)
                for y, x in product(range(0, height, by), range(0, width, bx))]


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


def plan_job(model_path, input_path, output, *, model, series=None, channel_axis=None,
             block: int | tuple[int, int] = DEFAULT_BLOCK, threshold=None, min_size=None,
             probabilities: bool = False, tile="auto", batch="auto", device="auto",
             precision="auto") -> ClusterJob:
    """Check every argument and build the job, before any work.

    Parameters
    ----------
    model_path, input_path, output : str or Path
    model : UNet
        The loaded model (checked: 2 classes; block size against its geometry).

    Raises
    ------
    ValueError
        Naming the parameter, what was expected and what was given.
    """
    from .io import open_image
    from .postprocess import postprocess_options
    from .predict import _check_channels, _normalised_axis, leading_shape

    if model.config.n_classes != 2:
        raise ValueError(f"model: the cluster path labels 2-class (foreground) models; this one "
                         f"has {model.config.n_classes} classes")
    threshold, min_size = postprocess_options(model.metadata, threshold, min_size)
    image = open_image(input_path, series=series)
    channel_axis = image.channel_axis if channel_axis is None else channel_axis
    channel_axis = _normalised_axis(channel_axis, len(image.shape))
    _check_channels(model, image.data, channel_axis)
    axes = "".join(a for i, a in enumerate(image.axes) if i != channel_axis)
    block = _checked_block(block, model)
    output = Path(output).absolute()
    if output.suffix.lower() != ".zarr":
        raise ValueError(f"output: expected a store name ending in .zarr, got {output}")
    stamp = Path(model_path).stat()
    return ClusterJob(
        str(Path(model_path).absolute()), str(Path(input_path).absolute()), str(output), series,
        channel_axis, leading_shape(image.shape, channel_axis) + tuple(image.shape[-2:]), axes, block,
        float(threshold), int(min_size), bool(probabilities), tile, batch, device, precision,
        f"{stamp.st_size}:{stamp.st_mtime_ns}",
    )


def _checked_block(block, model) -> tuple[int, int]:
    from .predict import smallest_tile

    sizes = block if isinstance(block, tuple) else (block, block)
    smallest, step = smallest_tile(model), model.size_step
    if len(sizes) != 2 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool)
                                  and n >= smallest and n % step == 0 for n in sizes):
        raise ValueError(f"block: expected a size in px of at least {smallest} (this model's "
                         f"smallest tile) and a multiple of {step}, got {block!r}")
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
            raise ValueError(f"output: {output} exists and is not a napari-tiled-unet store; "
                             f"choose another name or remove it yourself")
        if previous == job.record() and not overwrite:
            return len(list(_done_folder(output).glob("*.json"))) if not _complete(output) else len(job.blocks())
        if not overwrite:
            raise ValueError(f"output: {output} holds another run's result; pass --overwrite to "
                             f"replace it, or rerun that run's exact command to resume it")
        shutil.rmtree(output)
    if not output.parent.is_dir():
        raise ValueError(f"output: folder {output.parent} does not exist")
    _create_store(job)
    return 0


def _create_store(job: ClusterJob) -> None:
    import zarr

    root = zarr.open_group(job.output, mode="w", zarr_format=2)
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
    _done_folder(Path(job.output)).mkdir()
    # The record goes last: a store without it is not resumable and gets recreated.
    root.attrs[RECORD] = {"job": job.record(), "complete": False}


def _ngff_axes(axes: str) -> list[dict]:
    """NGFF axes for the output's axis letters (the input's, channel axis removed)."""
    kinds = {"T": "time", "Z": "space", "Y": "space", "X": "space"}
    return [{"name": a.lower(), "type": kinds.get(a, "custom")} for a in axes]


def _multiscale(name: str, axes: list[dict]) -> dict:
    return {"version": "0.4", "name": name, "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0] * len(axes)}]}]}


def _read_record(output: Path) -> dict | None:
    attributes = output / ".zattrs"
    try:
        return json.loads(attributes.read_text())[RECORD]["job"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _complete(output: Path) -> bool:
    try:
        return bool(json.loads((output / ".zattrs").read_text())[RECORD]["complete"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _done_folder(output: Path) -> Path:
    return output / _WORK / "done"


def segment_on_cluster(job: ClusterJob, client, *, overwrite: bool = False,
                       should_stop: Callable[[], bool] | None = None) -> Iterator[ClusterEvent]:
    """Run ``job`` on the Dask cluster of ``client``; a generator of :class:`ClusterEvent`.

    The store is prepared (created, or found for resuming) when this is called, before any
    work. Blocks run as tasks (one per output chunk; Dask retries those of a worker that dies);
    the merge runs as Dask array work on the same cluster.

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
    from distributed import as_completed

    blocks, output = job.blocks(), Path(job.output)
    total = len(blocks)
    if _complete(output):
        yield ClusterEvent("done", total, total, skipped=total, objects=_object_count(output))
        return
    done_names = {p.stem for p in _done_folder(output).glob("*.json")}
    todo = [b for b in blocks if b.name not in done_names]
    done = total - len(todo)
    yield ClusterEvent("blocks", done, total, skipped=done)
    run = uuid.uuid4().hex[:8]   # task names of this run (a cancelled run's may linger)
    stats = {lead: client.submit(_plane_stats, job, lead, key=f"stats-{'_'.join(map(str, lead))}-{run}")
             for lead in dict.fromkeys(b.lead for b in todo)}
    futures = [client.submit(_block_task, job, b, stats[b.lead], key=f"block-{b.name}-{run}")
               for b in todo]
    finished = as_completed(futures)
    for future in finished:
        future.result()   # a block that failed on every retry raises here
        done += 1
        if should_stop():
            client.cancel(futures + list(stats.values()))
            yield ClusterEvent("blocks", done, total, skipped=skipped, stopped=True)
            return
        yield ClusterEvent("blocks", done, total, skipped=skipped)
    yield ClusterEvent("merge", done, total, skipped=skipped)
    objects = _merge(job, client)
    yield ClusterEvent("done", done, total, skipped=skipped, objects=objects)


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
    key = ("image", job.input, job.series)
    if key not in _WORKER_CACHE:
        from .io import open_image

        _WORKER_CACHE[key] = open_image(job.input, series=job.series)
    return _WORKER_CACHE[key]


def _worker_device(device: str) -> str:
    """"auto" on a worker: its GPU when it has one; workers of one machine share its GPUs by
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

    from .normalize import Normalization
    from .predict import PlaneView

    model = _worker_model(job)
    norm = getattr(model, "normalization", None) or Normalization("none")
    with dask.config.set(scheduler="synchronous"):
        return norm.plane_stats(PlaneView(_worker_image(job).data, lead, job.channel_axis))


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

    marker = _done_folder(Path(job.output)) / f"{block.name}.json"
    if marker.exists():   # a retried task whose first run finished
        return int(json.loads(marker.read_text())["count"])
    # A lazy input is read here, in this task: never as new tasks on the cluster.
    with dask.config.set(scheduler="synchronous"):
        local, probability, sizes = _segmented_block(job, block, stats)
    where = block.lead + block.box
    _store_array(job, f"{_WORK}/local")[where] = local
    if job.probabilities:
        _store_array(job, "0")[where] = probability
    _write_json(marker, {"count": len(sizes), "sizes": sizes.tolist()})
    return len(sizes)


def _segmented_block(job: ClusterJob, block: Block, stats):
    """The block's probabilities, its local labels (1..n) and their sizes."""
    from scipy import ndimage

    from .predict import PlaneView, predict
    view = PlaneView(_worker_image(job).data, block.lead, job.channel_axis)
    probability = np.zeros(tuple(s.stop - s.start for s in block.box), np.float32)
    for _ in predict(_worker_model(job), view, probability, channel_axis=0, region=block.box,
                     normalization=_KnownStats(stats), tile=job.tile, batch=job.batch,
                     device=_worker_device(job.device), precision=job.precision, compile=False):
        pass
    foreground = probability > job.threshold
    local = np.zeros(probability.shape, np.uint32)
    count = ndimage.label(foreground, structure=np.ones((3, 3), bool), output=local)
    sizes = np.bincount(local[foreground], minlength=count + 1)[1:]
    return local, probability, sizes


def _store_array(job: ClusterJob, path: str):
    import zarr

    return zarr.open_array(f"{job.output}/{path}", mode="r+", zarr_format=2)


def _write_json(path: Path, values: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(values, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ---- merge -------------------------------------------------------------------------------

def _merge(job: ClusterJob, client) -> int:
    """Global ids: block labels offset to be unique, joined across block faces (dask-image),
    filtered by merged size, renumbered 1..N and written chunk by chunk."""
    import dask.array as da
    from dask_image.ndmeasure._utils._label import (
        connected_components_delayed,
        label_adjacency_graph,
    )

    output = Path(job.output)
    counts, sizes = _block_counts(job)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    total = int(np.sum(counts))
    if total >= np.iinfo(np.int32).max:
        raise ValueError(f"{total} block objects exceed the merge's int32 label range; use larger blocks")
    local = da.from_zarr(_store_array(job, f"{_WORK}/local"))
    flat = local.reshape((-1,) + local.shape[-2:])   # planes are independent: one plane axis
    numbered = flat.map_blocks(_offset_block, offsets, flat.numblocks, dtype=np.int32)
    graph = label_adjacency_graph(numbered, _PLANE_STRUCTURE, total)
    components = np.asarray(connected_components_delayed(graph).compute())
    merged_sizes = np.bincount(components, weights=np.concatenate([[0], sizes]))
    keep = merged_sizes >= max(job.min_size, 1)
    keep[components[0]] = False
    renumber = np.zeros(len(merged_sizes), np.uint32)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    lookup = client.scatter(renumber[components], broadcast=True)
    final = numbered.map_blocks(_looked_up, lookup, dtype=np.uint32).reshape(local.shape)
    da.store(final, _store_array(job, f"labels/{LABELS_NAME}/0"), lock=False)
    objects = int(keep.sum())
    _finish(output, objects)
    return objects


def _block_counts(job: ClusterJob) -> tuple[np.ndarray, np.ndarray]:
    """Object counts per block (C order) and every block object's size, in id order."""
    folder = _done_folder(Path(job.output))
    counts, sizes = [], []
    for block in job.blocks():
        record = json.loads((folder / f"{block.name}.json").read_text())
        counts.append(record["count"])
        sizes.extend(record["sizes"])
    return np.asarray(counts, np.int64), np.asarray(sizes, np.int64)


def _offset_block(block: np.ndarray, offsets: np.ndarray, numblocks, block_info=None) -> np.ndarray:
    index = np.ravel_multi_index(block_info[0]["chunk-location"], numblocks)
    numbered = block.astype(np.int32)
    numbered[block > 0] += np.int32(offsets[index])
    return numbered


def _looked_up(block: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    return lookup[block]


def _finish(output: Path, objects: int) -> None:
    import zarr

    root = zarr.open_group(str(output), mode="r+", zarr_format=2)
    record = dict(root.attrs[RECORD])
    root.attrs[RECORD] = {**record, "complete": True, "objects": objects}
    shutil.rmtree(output / _WORK, ignore_errors=True)


def _object_count(output: Path) -> int | None:
    try:
        return json.loads((output / ".zattrs").read_text())[RECORD].get("objects")
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
