"""Block-wise segmentation on a Dask LocalCluster: throughput, memory, scheduler overhead.

Prints, for 1 and 2 worker processes on the same stack (>= 1 Gpx, from disk, labels written
to OME-Zarr):

- MP/s end to end (blocks + the label merge), and the two phases apart;
- the peak RSS of each worker process (sampled every 0.1 s), on two stack sizes to show it is
  flat in the stack size;
- per block: the task's own time (from Dask's task stream) and the rest of the wall time per
  block and worker (scheduling, transfers, idle): the scheduler overhead;
- a projection for N GPU workers from those per-block costs (printed as a projection).

``--stand-in`` (default on a machine without CUDA) runs the bundled model's geometry with a
trivial forward (benchmarks/bench_gpu.py's StandIn), installed in each worker's model cache, so
the figures are the pipeline's and the scheduler's own; ``--real-planes N`` also times the real
bundled model on the first N planes to give the network's per-block cost on this machine.

    python benchmarks/bench_distributed.py [--stack bench_data/big.tif] [--small bench_data/mid.tif]
        [--block 1024] [--workers 1,2] [--real-planes 1]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import StandIn, ensure_stack  # noqa: E402

from napari_tiled_unet.core import distributed  # noqa: E402
from napari_tiled_unet.core.modelfile import load_model  # noqa: E402
from napari_tiled_unet.models import DEFAULT_MODEL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Network-only throughput of the bundled model on one H100 (bf16, channels_last), measured by
# the project at 1b5bb17 (issue 11); not measured here.
H100_FORWARD_MPS = 458.0


def install_stand_in(job):
    """Runs on each worker: the stand-in takes the model's place in the worker's cache."""
    from napari_tiled_unet.core import distributed as d
    from napari_tiled_unet.core.modelfile import load_model as load

    bundled = load(job.model)
    model = StandIn(bundled.config)
    model.normalization, model.metadata = bundled.normalization, bundled.metadata
    d._WORKER_CACHE.clear()
    d._WORKER_CACHE[("model", job.model, job.model_stamp)] = model.eval()


class PeakRSS:
    """Samples the RSS of the worker processes in a thread; ``peaks`` maps pid -> bytes."""

    def __init__(self, pids):
        import psutil

        self.processes = [psutil.Process(pid) for pid in pids]
        self.peaks = {p.pid: 0 for p in self.processes}
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            for process in self.processes:
                # a worker that exits is simply no longer sampled
                with contextlib.suppress(Exception):
                    self.peaks[process.pid] = max(
                        self.peaks[process.pid], process.memory_info().rss
                    )
            time.sleep(0.1)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return self.peaks


def run(stack: Path, workers: int, block: int, stand_in: bool, folder: Path, planes=None):
    from distributed import Client, LocalCluster, get_task_stream

    model = load_model(DEFAULT_MODEL)
    source = stack if planes is None else first_planes(stack, planes, folder)
    output = folder / f"out-{workers}.zarr"
    shutil.rmtree(output, ignore_errors=True)
    # The stand-in's sigmoid(intensity) crosses 0.6 where nuclei are (as in bench_gpu.py).
    threshold = 0.6 if stand_in else None
    job = distributed.plan_job(
        DEFAULT_MODEL, source, output, model=model, block=block, threshold=threshold
    )
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"OMP_NUM_THREADS": "1"},
        ) as cluster,
        Client(cluster) as client,
    ):
        if stand_in:
            client.run(install_stand_in, job)
        rss = PeakRSS(client.run(lambda: __import__("os").getpid()).values())
        start = time.perf_counter()
        merge_start = None
        with get_task_stream(client) as stream:
            for event in distributed.segment_on_cluster(job, client):
                if event.stage == "merge":
                    merge_start = time.perf_counter()
        end = time.perf_counter()
        peaks = rss.stop()
        durations = [
            sum(s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute")
            for task in stream.data
            if str(task["key"]).startswith("block-")
        ]
    pixels = int(np.prod(job.shape))
    blocks = len(job.blocks())
    return {
        "pixels": pixels,
        "blocks": blocks,
        "wall": end - start,
        "blocks_s": merge_start - start,
        "merge_s": end - merge_start,
        "task_s": float(np.mean(durations)) if durations else float("nan"),
        "peaks": sorted(peaks.values()),
        "objects": event.objects,
    }


def first_planes(stack: Path, planes: int, folder: Path) -> Path:
    import tifffile

    path = folder / f"first-{planes}.tif"
    if not path.exists():
        with tifffile.TiffFile(stack) as tif:
            tifffile.imwrite(path, np.stack([tif.pages[i].asarray() for i in range(planes)]))
    return path


def report(name, result, workers):
    per_block = result["blocks_s"] * workers / result["blocks"]
    print(
        f"{name}: {result['pixels'] / result['wall'] / 1e6:7.1f} MP/s end to end "
        f"({result['wall']:.1f} s: blocks {result['blocks_s']:.1f} s = "
        f"{result['pixels'] / result['blocks_s'] / 1e6:.1f} MP/s, merge {result['merge_s']:.1f} s); "
        f"{result['objects']} objects"
    )
    print(
        f"    {result['blocks']} blocks; per block: task {result['task_s'] * 1e3:.0f} ms, wall x "
        f"workers {per_block * 1e3:.0f} ms, overhead {(per_block - result['task_s']) * 1e3:.0f} ms; "
        f"peak RSS per worker {', '.join(f'{p / 2**20:.0f}' for p in result['peaks'])} MB"
    )
    return per_block


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", type=Path, default=ROOT / "bench_data" / "big.tif")
    parser.add_argument(
        "--small",
        type=Path,
        default=ROOT / "bench_data" / "mid.tif",
        help="a smaller stack of the same planes (memory flat in stack size)",
    )
    parser.add_argument("--block", type=int, default=distributed.DEFAULT_BLOCK)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--real-planes",
        type=int,
        default=1,
        help="planes to run with the real bundled model (0: skip)",
    )
    args = parser.parse_args()
    stack = ensure_stack(args.stack)
    counts = [int(n) for n in args.workers.split(",")]
    block_px = args.block**2
    with tempfile.TemporaryDirectory(dir=stack.parent) as tmp:
        folder = Path(tmp)
        print(
            f"stack {stack.name}; block {args.block} px; stand-in network (pipeline and "
            f"scheduler only)"
        )
        results = {}
        for workers in counts:
            results[workers] = run(stack, workers, args.block, True, folder)
            report(f"  {workers} worker(s), {stack.name}", results[workers], workers)
        if args.small.exists():
            small = run(args.small, max(counts), args.block, True, folder)
            report(f"  {max(counts)} worker(s), {args.small.name}", small, max(counts))
        real = None
        if args.real_planes:
            print(f"bundled model (real network, CPU) on the first {args.real_planes} plane(s):")
            real = run(stack, max(counts), args.block, False, folder, planes=args.real_planes)
            report(f"  {max(counts)} worker(s)", real, max(counts))
    host = results[max(counts)]["task_s"]
    overhead = max(
        0.0, results[max(counts)]["blocks_s"] * max(counts) / results[max(counts)]["blocks"] - host
    )
    gpu = block_px / (H100_FORWARD_MPS * 1e6)
    merge_rate = results[max(counts)]["pixels"] / results[max(counts)]["merge_s"]
    print(
        "\nProjection for N GPU workers (H100 network time from the project's 458 MP/s "
        "forward figure; host time and overhead per block measured above):"
    )
    print(
        f"  per block: network {gpu * 1e3:.0f} ms + host work {host * 1e3:.0f} ms + overhead "
        f"{overhead * 1e3:.0f} ms"
    )
    for n in (1, 2, 4, 8, 16):
        blocks_rate = n / (gpu + host + overhead)
        print(
            f"  {n:2d} GPU workers: blocks {blocks_rate * block_px / 1e6:7.0f} MP/s; with the merge "
            f"(measured {merge_rate / 1e6:.0f} MP/s on {max(counts)} workers, scales with workers) "
            f"{1 / (1 / (blocks_rate * block_px) + max(counts) / (n * merge_rate)) / 1e6:7.0f} MP/s"
        )


if __name__ == "__main__":
    main()
