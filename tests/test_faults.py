"""Faults while writing: a full disk, kill -9 mid-write, concurrent runs. No previous file is
ever lost or replaced, and no half-written file ever takes an output's name."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from napari_tiled_unet import cli
from napari_tiled_unet.core.modelfile import save_model

from .conftest import make_model


@pytest.fixture
def model_file(tmp_path):
    return save_model(make_model(depth=2, base_channels=2), tmp_path / "m.safetensors")


@pytest.fixture
def stack_file(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        np.random.default_rng(0).integers(0, 255, (40, 128, 128), np.uint8),
        metadata={"axes": "ZYX"},
    )
    return path


def run_segment(*args):
    code = "import sys; from napari_tiled_unet.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "segment", *map(str, args), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("failing", ["labels.tif", "prob.tif"])
def test_disk_full_on_either_output_keeps_both_previous_files(
    failing, tmp_path, model_file, stack_file, monkeypatch, capsys
):
    from napari_tiled_unet.core import io

    labels, probabilities = tmp_path / "labels.tif", tmp_path / "prob.tif"
    labels.write_bytes(b"old labels")
    probabilities.write_bytes(b"old probabilities")
    real = io._TiffTarget.write

    def disk_full(self, planes):
        if self.path.name == failing:
            for index, _ in enumerate(planes):
                if index == 3:
                    raise OSError(28, "No space left on device")
        return real(self, planes)

    monkeypatch.setattr(io._TiffTarget, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cli.main(
            [
                "segment",
                str(stack_file),
                "-o",
                str(labels),
                "--probabilities",
                str(probabilities),
                "--model",
                str(model_file),
                "--overwrite",
                "--quiet",
            ]
        )
    assert labels.read_bytes() == b"old labels"
    assert probabilities.read_bytes() == b"old probabilities"
    assert not list(tmp_path.glob(".*.partial"))


def test_kill_9_mid_write_keeps_the_old_file_and_the_next_run_cleans_up(
    tmp_path, model_file, stack_file
):
    labels = tmp_path / "labels.tif"
    labels.write_bytes(b"old labels")
    process = run_segment(
        stack_file, "-o", labels, "--model", model_file, "--overwrite", "--tile", "64"
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".labels.tif.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".labels.tif.*.partial")), "the run never started writing"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert labels.read_bytes() == b"old labels"
    assert (
        cli.main(
            [
                "segment",
                str(stack_file),
                "-o",
                str(labels),
                "--model",
                str(model_file),
                "--overwrite",
                "--quiet",
            ]
        )
        == 0
    )
    assert tifffile.imread(labels).shape == (40, 128, 128)
    assert not list(tmp_path.glob(".*.partial"))  # the dead run's file is gone too


def test_concurrent_runs_never_replace_each_other_without_overwrite(
    tmp_path, model_file, stack_file
):
    labels = tmp_path / "labels.tif"
    runs = [run_segment(stack_file, "-o", labels, "--model", model_file) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in runs]
    assert sorted(code for code, _ in results) == [0, 2]  # one wins; the other keeps its file
    assert any("appeared during the run" in err or "exists" in err for _, err in results)
    assert tifffile.imread(labels).shape == (40, 128, 128)
    assert not list(tmp_path.glob(".*.partial"))


def test_sigterm_is_reported_with_the_shells_code_and_writes_nothing(
    tmp_path, model_file, stack_file
):
    labels = tmp_path / "labels.tif"
    process = run_segment(stack_file, "-o", labels, "--model", model_file, "--tile", "64")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".labels.tif.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert not labels.exists() and not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("colour", [False, True])
def test_huge_planes_are_segmented_in_blocks_with_the_same_result(tmp_path, monkeypatch, colour):
    """Planes over HUGE_PLANE_PIXELS go through the block-wise path (bounded memory): the same
    probabilities, and the same objects up to a renumbering, as the whole-plane path; objects
    cut by the 48 px blocks are joined. RGB planes are averaged to grey in both paths."""
    from scipy import ndimage

    from napari_tiled_unet.core import distributed
    from napari_tiled_unet.core.normalize import Normalization
    from napari_tiled_unet.core.predict import predict_array

    model = make_model(depth=2, base_channels=4)
    model.normalization, model.metadata = Normalization(), {}
    save_model(model, tmp_path / "model.safetensors")
    rng = np.random.default_rng(3)
    stack = ndimage.gaussian_filter(rng.random((2, 150, 170)), (0, 5, 5))
    stack = ((stack - stack.min()) / np.ptp(stack) * 255).astype(np.uint8)
    if colour:  # three different colours: their mean is what a one-channel model sees
        rgb = np.stack([stack, stack[:, ::-1], stack[:, :, ::-1]], axis=-1)
        tifffile.imwrite(tmp_path / "in.tif", rgb, photometric="rgb")
        stack = rgb.mean(axis=-1, dtype=np.float32)
    else:
        tifffile.imwrite(tmp_path / "in.tif", stack)
    threshold = np.percentile(predict_array(model, stack), 60)
    args = [
        str(tmp_path / "in.tif"),
        "--model",
        str(tmp_path / "model.safetensors"),
        "--threshold",
        str(threshold),
        "--min-size",
        "20",
        "--quiet",
    ]
    assert (
        cli.main(
            [
                "segment",
                *args,
                "-o",
                str(tmp_path / "whole.tif"),
                "--probabilities",
                str(tmp_path / "whole_p.tif"),
            ]
        )
        == 0
    )
    monkeypatch.setattr(cli, "HUGE_PLANE_PIXELS", 100 * 100)
    monkeypatch.setattr(distributed, "DEFAULT_BLOCK", 48)
    assert (
        cli.main(
            [
                "segment",
                *args,
                "-o",
                str(tmp_path / "blocks.tif"),
                "--probabilities",
                str(tmp_path / "blocks_p.tif"),
            ]
        )
        == 0
    )
    with tifffile.TiffFile(tmp_path / "blocks.tif") as tif:
        assert tif.pages[0].is_tiled and tif.series[0].axes == "QYX"
        blocks = tif.asarray()
    whole = tifffile.imread(tmp_path / "whole.tif")
    np.testing.assert_allclose(
        tifffile.imread(tmp_path / "blocks_p.tif"),
        tifffile.imread(tmp_path / "whole_p.tif"),
        atol=1e-6,
        rtol=0,
    )
    # The paths agree to 1e-6, and this untrained net's probabilities lie within 0.01 of each
    # other: a pixel that close to the threshold may fall on either side.
    decided = np.abs(tifffile.imread(tmp_path / "whole_p.tif") - threshold) > 1e-6
    assert decided.mean() > 0.99
    np.testing.assert_array_equal((blocks > 0)[decided], (whole > 0)[decided])
    cut = 0
    for mine, theirs in zip(blocks, whole):
        both = (mine > 0) & (theirs > 0)
        pairs = np.unique(np.stack([mine[both], theirs[both]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] > 0
        cut += sum(
            any(s.start // 48 != (s.stop - 1) // 48 for s in box)
            for box in ndimage.find_objects(theirs)
            if box is not None
        )
    assert cut >= 3
    assert not list(tmp_path.glob(".*partial*"))


def test_huge_planes_refuse_what_needs_whole_planes(
    tmp_path, model_file, stack_file, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "HUGE_PLANE_PIXELS", 100)
    code = cli.main(
        [
            "segment",
            str(stack_file),
            "-o",
            str(tmp_path / "out.tif"),
            "--model",
            str(model_file),
            "--measure",
            "--quiet",
        ]
    )
    assert code == 2
    assert "--measure: not available for planes over" in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


def test_huge_planes_say_that_the_models_neck_split_and_floor_need_whole_planes(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(cli, "HUGE_PLANE_PIXELS", 100)
    stack = tmp_path / "small.tif"
    tifffile.imwrite(stack, np.random.default_rng(1).integers(0, 255, (2, 64, 64), np.uint8))
    options = {"threshold": 0.5, "min_size": 0, "split": 2, "min_peak": 0.9}
    model = save_model(
        make_model(depth=2, base_channels=2),
        tmp_path / "split.safetensors",
        metadata={"postprocess": options},
    )
    args = ["segment", str(stack), "-o", str(tmp_path / "out.tif"), "--model", str(model)]
    for given in (["--split", "2"], ["--min-peak", "0.9"]):
        assert cli.main([*args, "--quiet", *given]) == 2
        assert f"{given[0]}: not available for planes over" in capsys.readouterr().err
        assert not (tmp_path / "out.tif").exists()
    assert cli.main([*args, "--quiet"]) == 0
    said = capsys.readouterr()
    assert (
        "objects are connected components: the model's neck splitting (--split 2) and object "
        "floor (--min-peak 0.9) need whole planes" in said.err
    )
    assert "segmented in blocks" in said.out and (tmp_path / "out.tif").is_file()
    assert cli.main([*args, "--quiet", "--split", "0", "--overwrite"]) == 0
    said = capsys.readouterr().err
    assert "the model's object floor (--min-peak 0.9) needs whole planes" in said
    assert "neck splitting" not in said
    assert cli.main([*args, "--quiet", "--split", "0", "--min-peak", "0", "--overwrite"]) == 0
    assert "whole planes" not in capsys.readouterr().err
