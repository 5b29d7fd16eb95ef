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
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (40, 128, 128), np.uint8),
                     metadata={"axes": "ZYX"})
    return path


def run_segment(*args):
    code = "import sys; from napari_tiled_unet.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "segment", *map(str, args), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("failing", ["labels.tif", "prob.tif"])
def test_disk_full_on_either_output_keeps_both_previous_files(failing, tmp_path, model_file,
                                                              stack_file, monkeypatch, capsys):
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
        cli.main(["segment", str(stack_file), "-o", str(labels), "--probabilities",
                  str(probabilities), "--model", str(model_file), "--overwrite", "--quiet"])
    assert labels.read_bytes() == b"old labels"
    assert probabilities.read_bytes() == b"old probabilities"
    assert not list(tmp_path.glob(".*.partial"))


def test_kill_9_mid_write_keeps_the_old_file_and_the_next_run_cleans_up(tmp_path, model_file,
                                                                         stack_file):
    labels = tmp_path / "labels.tif"
    labels.write_bytes(b"old labels")
    process = run_segment(stack_file, "-o", labels, "--model", model_file, "--overwrite",
                          "--tile", "64")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".labels.tif.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".labels.tif.*.partial")), "the run never started writing"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert labels.read_bytes() == b"old labels"
    assert cli.main(["segment", str(stack_file), "-o", str(labels), "--model", str(model_file),
                     "--overwrite", "--quiet"]) == 0
    assert tifffile.imread(labels).shape == (40, 128, 128)
    assert not list(tmp_path.glob(".*.partial"))   # the dead run's file is gone too


def test_concurrent_runs_never_replace_each_other_without_overwrite(tmp_path, model_file,
                                                                    stack_file):
    labels = tmp_path / "labels.tif"
    runs = [run_segment(stack_file, "-o", labels, "--model", model_file) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in runs]
    assert sorted(code for code, _ in results) == [0, 2]   # one wins; the other keeps its file
    assert any("appeared during the run" in err or "exists" in err for _, err in results)
    assert tifffile.imread(labels).shape == (40, 128, 128)
    assert not list(tmp_path.glob(".*.partial"))


def test_sigterm_is_reported_with_the_shells_code_and_writes_nothing(tmp_path, model_file,
                                                                      stack_file):
    labels = tmp_path / "labels.tif"
    process = run_segment(stack_file, "-o", labels, "--model", model_file, "--tile", "64")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".labels.tif.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert not labels.exists() and not list(tmp_path.glob(".*.partial"))
