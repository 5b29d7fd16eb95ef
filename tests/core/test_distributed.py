"""Block-wise segmentation on a Dask LocalCluster (2 worker processes): exact probabilities,
globally right labels, a killed worker, resuming, and bad input."""

import os
import signal
import sys

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_tiled_unet.cli import main
from napari_tiled_unet.core import distributed
from napari_tiled_unet.core.modelfile import load_model, save_model
from napari_tiled_unet.core.normalize import Normalization
from napari_tiled_unet.core.predict import predict_array
from napari_tiled_unet.core.segment import segment
from tests.conftest import make_model

pytest.importorskip("distributed")

BLOCK = 48  # the test model's smallest tile is 44 px: blocks smaller than its objects


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"OMP_NUM_THREADS": "1"},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A model file, a 2-plane stack, and the single-process result at a threshold that gives
    objects larger than a block."""
    folder = tmp_path_factory.mktemp("cluster")
    model = make_model(depth=2, base_channels=4)
    model.normalization, model.metadata = Normalization(), {}
    save_model(model, folder / "model.safetensors")
    model = load_model(folder / "model.safetensors")
    rng = np.random.default_rng(7)
    stack = ndimage.gaussian_filter(rng.random((2, 150, 170)), (0, 5, 5))
    stack = ((stack - stack.min()) / np.ptp(stack) * 255).astype(np.uint8)
    tifffile.imwrite(folder / "stack.tif", stack)
    probability = predict_array(model, stack)
    threshold = float(np.percentile(probability, 60))
    events = list(segment(model, stack, threshold=threshold, min_size=20))
    labels = np.stack([plane.labels for event in events for plane in event.planes])
    return folder, model, stack, probability, labels, threshold


def _job(case, output, **options):
    folder, model, *_, threshold = case
    return distributed.plan_job(
        folder / "model.safetensors",
        folder / "stack.tif",
        output,
        model=model,
        block=BLOCK,
        threshold=threshold,
        min_size=20,
        probabilities=True,
        **options,
    )


def _assert_same_labels(ours: np.ndarray, reference: np.ndarray) -> None:
    """Equal up to a renumbering: the same foreground, and in each plane a one-to-one map of
    ids (the reference's ids restart in each plane)."""
    np.testing.assert_array_equal(ours > 0, reference > 0)
    for mine, theirs in zip(ours, reference):
        pairs = np.unique(np.stack([mine[mine > 0], theirs[theirs > 0]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] > 0


def _cut_by_blocks(labels: np.ndarray) -> int:
    """Objects of ``labels`` (Z, Y, X) that span more than one block."""
    count = 0
    for plane in labels:
        for box in ndimage.find_objects(plane):
            if box is not None and any(s.start // BLOCK != (s.stop - 1) // BLOCK for s in box):
                count += 1
    return count


def test_cluster_equals_the_single_process_engine(case, client, tmp_path):
    _, _, _, probability, reference, _ = case
    assert _cut_by_blocks(reference) >= 5  # the merge across block faces is exercised
    events = list(distributed.segment_on_cluster(_job(case, tmp_path / "out.zarr"), client))
    assert events[-1].stage == "done" and events[-1].done == events[-1].total == 2 * 4 * 4
    result = distributed.open_store(tmp_path / "out.zarr")
    np.testing.assert_allclose(result["probabilities"].compute(), probability, atol=1e-6, rtol=0)
    labels = result["labels"].compute()
    _assert_same_labels(labels, reference)
    # ids are unique across planes: no id of plane 0 appears in plane 1
    assert not set(np.unique(labels[0])[1:]) & set(np.unique(labels[1])[1:])
    assert (
        events[-1].objects
        == len(np.unique(labels)) - 1
        == sum(len(np.unique(plane)) - 1 for plane in reference)
    )
    assert not (tmp_path / "out.zarr" / ".work").exists()


def test_ome_zarr_input_gives_the_same_result(case, client, tmp_path):
    import zarr

    folder, model, stack, _, reference, threshold = case
    source = zarr.open_group(tmp_path / "in.zarr", mode="w", zarr_format=2)
    source.create_array("0", data=stack, chunks=(1, 64, 64))
    source.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": n, "type": "space"} for n in "zyx"],
            "datasets": [{"path": "0"}],
        }
    ]
    job = distributed.plan_job(
        folder / "model.safetensors",
        tmp_path / "in.zarr",
        tmp_path / "out.zarr",
        model=model,
        block=BLOCK,
        threshold=threshold,
        min_size=20,
    )
    assert job.axes == "ZYX"
    list(distributed.segment_on_cluster(job, client))
    _assert_same_labels(
        distributed.open_store(tmp_path / "out.zarr")["labels"].compute(), reference
    )


def test_a_stopped_run_resumes_without_redoing_finished_blocks(case, client, tmp_path):
    _, _, _, probability, reference, _ = case
    job = _job(case, tmp_path / "out.zarr")
    seen = []

    def stop_after_five():
        seen.append(1)
        return len(seen) >= 5

    first = list(distributed.segment_on_cluster(job, client, should_stop=stop_after_five))
    assert first[-1].stopped and first[-1].stage == "blocks"
    finished = len(list((tmp_path / "out.zarr" / ".work" / "done").glob("*.npz")))
    assert 5 <= finished < 32
    with pytest.raises(ValueError, match="unfinished"):
        distributed.open_store(tmp_path / "out.zarr")
    second = list(distributed.segment_on_cluster(job, client))
    assert second[0].skipped == finished and second[-1].skipped == finished
    assert len([e for e in second if e.stage == "blocks"]) == 1 + 32 - finished
    result = distributed.open_store(tmp_path / "out.zarr")
    np.testing.assert_allclose(result["probabilities"].compute(), probability, atol=1e-6, rtol=0)
    _assert_same_labels(result["labels"].compute(), reference)
    third = list(distributed.segment_on_cluster(job, client))  # complete: nothing is redone
    assert [e.stage for e in third] == ["done"] and third[0].skipped == 32


def test_a_killed_worker_does_not_change_the_result(case, tmp_path):
    from distributed import Client, LocalCluster

    _, _, _, probability, reference, _ = case
    job = _job(case, tmp_path / "out.zarr", tile=44)  # small tiles: blocks take a while
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"OMP_NUM_THREADS": "1"},
        ) as cluster,
        Client(cluster) as client,
    ):
        killed = None
        for event in distributed.segment_on_cluster(job, client):
            if killed is None and event.stage == "blocks" and 0 < event.done < event.total - 4:
                victim = next(iter(client.run(os.getpid).values()))
                os.kill(victim, signal.SIGKILL)
                killed = event.done
        assert killed is not None and event.stage == "done"
    result = distributed.open_store(tmp_path / "out.zarr")
    np.testing.assert_allclose(result["probabilities"].compute(), probability, atol=1e-6, rtol=0)
    _assert_same_labels(result["labels"].compute(), reference)


def test_the_command_line_runs_on_a_local_cluster_and_resumes(case, tmp_path, capsys):
    folder, _, _, _, reference, threshold = case
    args = [
        str(folder / "stack.tif"),
        "-o",
        str(tmp_path / "out.zarr"),
        "--model",
        str(folder / "model.safetensors"),
        "--cluster",
        "local:2",
        "--block",
        str(BLOCK),
        "--threshold",
        str(threshold),
        "--min-size",
        "20",
        "--quiet",
    ]
    assert main(["segment", *args]) == 0
    objects = len(np.unique(distributed.open_store(tmp_path / "out.zarr")["labels"].compute())) - 1
    assert f"out.zarr: {objects} objects in 32 blocks\n" in capsys.readouterr().out
    assert main(["segment", *args]) == 0  # the same command again: already complete
    assert "(32 blocks done by an earlier run)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--block", "40"], "--block: expected a size in px of at least 44"),
        (["--block", "50"], "a multiple of 4, got 50"),
        (["--cluster", "remote:2"], "--cluster: expected local:N"),
        (["--probabilities", "p.tif"], "--probabilities: with a .zarr output"),
        (["--diameter", "20"], "--diameter: not available with a .zarr output"),
        (["--split", "2"], "--split: not available with a .zarr output"),
        (["--min-peak", "0.9"], "--min-peak: not available with a .zarr output"),
    ],
)
def test_bad_cluster_input_is_refused_before_any_work(case, tmp_path, capsys, extra, message):
    folder = case[0]
    code = main(
        [
            "segment",
            str(folder / "stack.tif"),
            "-o",
            str(tmp_path / "out.zarr"),
            "--model",
            str(folder / "model.safetensors"),
            "--quiet",
            *extra,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.zarr").exists()


def test_an_unreachable_scheduler_is_a_clear_error(case, tmp_path, capsys):
    folder = case[0]
    code = main(
        [
            "segment",
            str(folder / "stack.tif"),
            "-o",
            str(tmp_path / "out.zarr"),
            "--model",
            str(folder / "model.safetensors"),
            "--scheduler",
            "tcp://127.0.0.1:9",
            "--quiet",
        ]
    )
    assert code == 2
    assert "--scheduler: cannot reach tcp://127.0.0.1:9" in capsys.readouterr().err
    assert not (tmp_path / "out.zarr").exists()


def test_an_existing_output_is_kept(case, client, tmp_path):
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "data.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a napari-tiled-unet store"):
        distributed.segment_on_cluster(_job(case, foreign), client, overwrite=True)
    assert (foreign / "data.txt").read_text() == "mine"
    list(distributed.segment_on_cluster(_job(case, tmp_path / "out.zarr"), client))
    other = _job(case, tmp_path / "out.zarr", tile=60)  # another run's settings
    with pytest.raises(ValueError, match="holds another run's result; pass --overwrite"):
        distributed.segment_on_cluster(other, client)
    assert distributed.open_store(tmp_path / "out.zarr")["labels"].shape == (2, 150, 170)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")
def test_a_three_class_model_is_refused(case, tmp_path):
    folder, *_ = case
    model = make_model(depth=2, base_channels=4, n_classes=3)
    with pytest.raises(ValueError, match="model: the cluster path labels 2-class"):
        distributed.plan_job(
            folder / "model.safetensors",
            folder / "stack.tif",
            tmp_path / "out.zarr",
            model=model,
            block=BLOCK,
        )


def test_a_channel_axis_that_is_not_one_is_refused(case, tmp_path):
    with pytest.raises(ValueError, match="channel_axis: expected an axis number, 'auto' or None"):
        _job(case, tmp_path / "out.zarr", channel_axis="colour")


def test_napari_reader_opens_a_finished_store_and_nothing_else(case, client, tmp_path):
    from napari_tiled_unet._napari.reader import get_reader

    job = _job(case, tmp_path / "out.zarr")
    list(distributed.segment_on_cluster(job, client, should_stop=lambda: True))
    assert get_reader(str(tmp_path / "out.zarr")) is None  # unfinished
    list(distributed.segment_on_cluster(job, client))
    layers = get_reader(str(tmp_path / "out.zarr"))(str(tmp_path / "out.zarr"))
    assert [kind for *_, kind in layers] == ["image", "labels"]
    np.testing.assert_allclose(layers[0][0].compute(), case[3], atol=1e-6, rtol=0)
    _assert_same_labels(layers[1][0].compute(), case[4])
    assert get_reader(str(tmp_path)) is None


def test_the_merge_joins_objects_that_touch_only_at_block_corners(client, tmp_path):
    """Blocks labelled apart, then merged: equal to an 8-connected labelling of the plane,
    for diagonal and anti-diagonal touches across the corner of four blocks."""
    foreground = np.zeros((96, 96), bool)
    foreground[47, 40:48] = foreground[48, 48:56] = True  # diagonal touch
    foreground[40:48, 48] = foreground[48:56, 47] = True  # anti-diagonal touch
    foreground[10:20, 40:60] = True  # a plain cut object
    foreground[70, 70] = True  # below min_size
    job = distributed.ClusterJob(
        "m",
        "i",
        str(tmp_path / "out.zarr"),
        None,
        None,
        (1, 96, 96),
        "ZYX",
        (48, 48),
        0.5,
        2,
        False,
    )
    distributed.prepare_store(job)
    for block in job.blocks():
        local = ndimage.label(foreground[block.box], structure=np.ones((3, 3), bool))[0].astype(
            np.uint32
        )
        distributed._store_array(job, ".work/local")[block.lead + block.box] = local
        distributed._write_npz(
            distributed._marker(job, block),
            count=int(local.max()),
            sizes=np.bincount(local.ravel())[1:],
            top=local[0],
            bottom=local[-1],
            left=local[:, 0],
            right=local[:, -1],
        )
    assert distributed._merge(job, client) == 2
    reference = ndimage.label(foreground, structure=np.ones((3, 3), bool))[0]
    reference[70, 70] = 0
    _assert_same_labels(
        distributed.open_store(tmp_path / "out.zarr")["labels"].compute(), reference[None]
    )
