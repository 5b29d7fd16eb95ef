import re
import subprocess
import sys
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_tiled_unet import cli
from napari_tiled_unet.core.modelfile import load_model, save_model

from .conftest import make_model


@pytest.fixture
def model_file(tmp_path):
    return save_model(make_model(depth=2, base_channels=3), tmp_path / "model.safetensors")


@pytest.fixture
def stack_file(tmp_path, rng):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path,
        rng.integers(0, 4000, (3, 90, 130), dtype=np.uint16),
        metadata={"axes": "ZYX"},
        photometric="minisblack",
    )
    return path


def annotated_files(folder, seeds, size):
    """Synthetic image and uint16 label TIFFs in ``folder``; returns (image paths, label paths)."""
    from .synthetic import touching_blobs

    images, labels = [], []
    for seed in seeds:
        image, truth = touching_blobs(seed, size=size)
        images.append(folder / f"img{seed}.tif")
        labels.append(folder / f"lab{seed}.tif")
        tifffile.imwrite(images[-1], image)
        tifffile.imwrite(labels[-1], truth.astype(np.uint16))
    return images, labels


def segment(*args):
    return cli.main(["segment", *map(str, args), "--quiet"])


def test_small_tiles_give_the_same_probabilities_as_one_whole_tile(
    tmp_path, model_file, stack_file
):
    for name, tile in (("small", 50), ("whole", 1000)):
        assert (
            segment(
                stack_file,
                "-o",
                tmp_path / f"{name}_labels.tif",
                "--model",
                model_file,
                "--probabilities",
                tmp_path / f"{name}_prob.tif",
                "--tile",
                tile,
                "--threshold",
                0.5,
            )
            == 0
        )
    small, whole = (tifffile.imread(tmp_path / f"{n}_prob.tif") for n in ("small", "whole"))
    assert small.shape == (3, 90, 130) and small.dtype == np.float32
    assert np.abs(small - whole).max() <= 1e-5
    labels = tifffile.imread(tmp_path / "small_labels.tif")
    assert labels.shape == (3, 90, 130)
    assert ((labels > 0) == (small > 0.5)).all()


def test_existing_output_is_refused_unless_overwrite(tmp_path, model_file, stack_file, capsys):
    out = tmp_path / "labels.tif"
    out.write_bytes(b"keep me")
    assert segment(stack_file, "-o", out, "--model", model_file) == 2
    assert "--output: " in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert segment(stack_file, "-o", out, "--model", model_file, "--overwrite") == 0
    assert tifffile.imread(out).shape == (3, 90, 130)


def test_input_is_never_overwritten(model_file, stack_file, capsys):
    before = stack_file.read_bytes()
    assert segment(stack_file, "-o", stack_file, "--model", model_file, "--overwrite") == 2
    assert "is one of this run's inputs" in capsys.readouterr().err
    assert stack_file.read_bytes() == before


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing input", "input: no such file"),
        ("text input", "input: expected a TIFF file"),
        ("truncated input", "input: TIFF file is truncated"),
        ("image as model", "model: expected a napari-tiled-unet model file"),
        ("unknown device", "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
        ("wrong channels", "the model expects 1 input channel(s), got 3"),
        ("bad tile", "--tile: expected a positive integer or 'auto'"),
    ],
)
def test_bad_input_fails_before_work_with_a_clear_message(
    problem, message, tmp_path, model_file, stack_file, capsys
):
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(stack_file.read_bytes()[:30000])
    args = {
        "missing input": [tmp_path / "nope.tif", "--model", model_file],
        "text input": [text, "--model", model_file],
        "truncated input": [truncated, "--model", model_file],
        "image as model": [stack_file, "--model", stack_file],
        "unknown device": [stack_file, "--model", model_file, "--device", "gpu0"],
        "wrong channels": [stack_file, "--model", model_file, "--channel-axis", "0"],
        "bad tile": [stack_file, "--model", model_file, "--tile", "big"],
    }[problem]
    assert segment(*args, "-o", tmp_path / "out.tif") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


def test_stop_mid_run_leaves_no_output_and_no_partial_file(
    tmp_path, model_file, stack_file, monkeypatch
):
    polls = []
    monkeypatch.setattr(cli._StopFlag, "__call__", lambda self: polls.append(1) or len(polls) > 2)
    code = segment(
        stack_file,
        "-o",
        tmp_path / "labels.tif",
        "--model",
        model_file,
        "--probabilities",
        tmp_path / "prob.tif",
        "--tile",
        50,
        "--batch",
        2,
    )
    assert code == 130 and len(polls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "stack.tif"]


def test_info_describes_the_model(model_file, capsys):
    assert cli.main(["info", str(model_file)]) == 0
    text = capsys.readouterr().out
    assert "U-Net depth 2, 3 base channels, valid padding" in text
    assert "margin:         40 px" in text


def test_console_script_runs_as_a_program(tmp_path, model_file, stack_file):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_tiled_unet.cli",
            "segment",
            str(stack_file),
            "-o",
            str(tmp_path / "l.tif"),
            "--model",
            str(model_file),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith(f"{tmp_path / 'l.tif'}: ")
    assert "object" in result.stdout and "in 3 plane(s)" in result.stdout


def test_train_writes_a_model_that_segment_uses(tmp_path, capsys):
    images, labels = annotated_files(tmp_path, seeds=range(3), size=96)
    model = tmp_path / "trained.safetensors"
    code = cli.main(
        [
            "train",
            "--images",
            *map(str, images),
            "--labels",
            *map(str, labels),
            "-o",
            str(model),
            "--iterations",
            "6",
            "--validate-every",
            "3",
            "--patch",
            "92",
            "--depth",
            "2",
            "--base-channels",
            "4",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    summary = capsys.readouterr().out
    assert code == 0 and model.is_file()
    assert summary.startswith("done after 6 iterations") and f"model: {model}" in summary
    assert segment(images[0], "-o", tmp_path / "seg.tif", "--model", model) == 0
    assert (
        cli.main(
            ["train", "--images", str(images[0]), "--labels", str(labels[0]), "-o", str(model)]
        )
        == 2
    )
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_segment_takes_post_processing_from_the_model_unless_given(tmp_path, stack_file):
    from napari_tiled_unet.core.postprocess import decode_plane, label_plane

    model = make_model(depth=2, base_channels=3)
    # this untrained network's objects at 0.9 peak at 0.94-1.0: the floor drops about half
    options = {"threshold": 0.9, "min_size": 4, "split": 1, "min_peak": 0.9999}
    path = save_model(model, tmp_path / "m.safetensors", metadata={"postprocess": options})
    assert (
        segment(
            stack_file,
            "-o",
            tmp_path / "l.tif",
            "--model",
            path,
            "--probabilities",
            tmp_path / "p.tif",
        )
        == 0
    )
    probability, labels = tifffile.imread(tmp_path / "p.tif"), tifffile.imread(tmp_path / "l.tif")
    for plane in range(3):
        expected = decode_plane(probability[plane], 0.9, 4, "paper", 1, 0.9999)
        np.testing.assert_array_equal(labels[plane], expected)
    # the floor counts: it drops objects that pass the threshold but never reach it
    floorless = sum(int(label_plane(p, 0.9, 4, 1).max()) for p in probability)
    assert 0 < labels.max(axis=(1, 2)).sum() < floorless
    assert (
        segment(
            stack_file,
            "-o",
            tmp_path / "l.tif",
            "--model",
            path,
            "--overwrite",
            "--threshold",
            0.3,
            "--min-size",
            0,
            "--split",
            0,
            "--min-peak",
            0,
        )
        == 0
    )
    labels = tifffile.imread(tmp_path / "l.tif")
    np.testing.assert_array_equal(labels[1], label_plane(probability[1], 0.3, 0))


def test_a_bad_floor_is_refused_before_any_work(tmp_path, stack_file, capsys):
    path = save_model(make_model(depth=2, base_channels=3), tmp_path / "m.safetensors")
    out = tmp_path / "l.tif"
    assert segment(stack_file, "-o", out, "--model", path, "--min-peak", 1.5) == 2
    assert "min_peak: expected a number in [0, 1], got 1.5" in capsys.readouterr().err
    assert not out.exists()


def test_tune_stores_the_best_threshold_and_size_in_the_model(tmp_path, rng):
    from napari_tiled_unet.core.metrics import match_objects
    from napari_tiled_unet.core.modelfile import load_model
    from napari_tiled_unet.core.postprocess import (
        MIN_PEAKS,
        MIN_SIZES,
        SPLITS,
        THRESHOLDS,
        decode_plane,
    )
    from napari_tiled_unet.core.predict import predict_array

    path = save_model(
        make_model(depth=2, base_channels=3, seed=4),
        tmp_path / "m.safetensors",
        metadata={"note": "kept"},
    )
    images, labels = annotated_files(tmp_path, seeds=range(2), size=80)
    assert (
        cli.main(["tune", str(path), "--images", *map(str, images), "--labels", *map(str, labels)])
        == 0
    )
    model = load_model(path)
    chosen = model.metadata["postprocess"]
    assert model.metadata["note"] == "kept" and chosen["planes"] == 2
    probabilities = [predict_array(model, tifffile.imread(p)) for p in images]
    truths = [tifffile.imread(p) for p in labels]
    grid = {
        options: np.mean(
            [
                match_objects(decode_plane(p, *options[:2], "paper", *options[2:]), g, 0.5).ap
                for p, g in zip(probabilities, truths)
            ]
        )
        for options in product(THRESHOLDS, MIN_SIZES, SPLITS, MIN_PEAKS)
    }
    assert chosen["ap50"] == pytest.approx(max(grid.values()), abs=1e-12)
    best = (chosen["threshold"], chosen["min_size"], chosen["split"], chosen["min_peak"])
    assert grid[best] == pytest.approx(chosen["ap50"], abs=1e-12)


@pytest.mark.parametrize(
    "case, match",
    [
        ("folder", "--output: .* is a folder; expected a file name"),
        ("png", "--output: expected a file name ending in .tif or .tiff, got .*x.png"),
        ("model", "--output: .* is one of this run's inputs"),
        ("hard link", "--output: .* is one of this run's inputs"),
        ("read-only", "--output: folder .* is not writable"),
    ],
)
def test_segment_refuses_bad_outputs_before_any_work(
    case, match, tmp_path, model_file, capsys, monkeypatch
):
    import os

    from napari_tiled_unet.core import segment as segment_module

    image = tmp_path / "in.tif"
    tifffile.imwrite(image, np.zeros((40, 40), np.uint8))
    output = {
        "folder": tmp_path / "out.tif",
        "png": tmp_path / "x.png",
        "model": tmp_path / "model.tif",
        "hard link": tmp_path / "link.tif",
        "read-only": tmp_path / "ro" / "labels.tif",
    }[case]
    model = model_file
    if case == "folder":
        output.mkdir()
    if case == "model":
        model = output
        output.write_bytes(model_file.read_bytes())
    if case == "hard link":
        os.link(image, output)
    if case == "read-only":
        output.parent.mkdir()
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != output.parent)
    monkeypatch.setattr(segment_module, "segment", lambda *a, **k: pytest.fail("work started"))
    args = ["segment", str(image), "-o", str(output), "--model", str(model), "--overwrite"]
    assert cli.main(args) == 2
    assert re.search(match, capsys.readouterr().err)


def test_train_never_replaces_one_of_its_inputs(tmp_path, capsys):
    image, labels = tmp_path / "img0.tif", tmp_path / "lab0.tif"
    tifffile.imwrite(image, np.zeros((40, 40), np.uint8))
    tifffile.imwrite(labels, np.ones((40, 40), np.uint16))
    before = image.read_bytes()
    code = cli.main(
        [
            "train",
            "--images",
            str(image),
            "--labels",
            str(labels),
            "-o",
            str(image),
            "--overwrite",
            "--iterations",
            "1",
        ]
    )
    assert code == 2 and "is one of this run's inputs" in capsys.readouterr().err
    assert image.read_bytes() == before


def test_a_folder_without_tiffs_as_input_says_so(tmp_path, capsys):
    assert cli.main(["segment", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "holds no .tif or .tiff file" in capsys.readouterr().err


def test_a_folder_is_segmented_into_a_folder_with_the_model_loaded_once(
    tmp_path, model_file, monkeypatch, capsys
):
    from napari_tiled_unet.core import modelfile

    (tmp_path / "in").mkdir()
    images, _ = annotated_files(tmp_path / "in", seeds=range(3), size=64)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    loads = []
    real = modelfile.load_model
    monkeypatch.setattr(modelfile, "load_model", lambda path: loads.append(path) or real(path))
    out = tmp_path / "out"
    assert (
        cli.main(
            ["segment", str(tmp_path / "in"), "-o", str(out), "--model", str(model_file), "--quiet"]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "img0_labels.tif",
        "img1_labels.tif",
        "img2_labels.tif",
        "lab0_labels.tif",
        "lab1_labels.tif",
        "lab2_labels.tif",
    ]
    assert len(loads) == 1
    single = tmp_path / "single.tif"
    assert (
        cli.main(
            ["segment", str(images[1]), "-o", str(single), "--model", str(model_file), "--quiet"]
        )
        == 0
    )
    assert np.array_equal(tifffile.imread(out / "img1_labels.tif"), tifffile.imread(single))
    assert (
        cli.main(
            [
                "segment",
                str(images[0]),
                str(images[1]),
                "-o",
                str(single),
                "--model",
                str(model_file),
            ]
        )
        == 2
    )
    assert "expected a folder" in capsys.readouterr().err


def test_version_and_a_torch_free_info(model_file, capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("tiled-unet ")
    code = (
        "import sys; from napari_tiled_unet.cli import main; main(['info', sys.argv[1]]); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(model_file)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().endswith("False") and "parameters" in result.stdout


def test_boundary_models_train_tune_and_segment_from_the_command_line(tmp_path, capsys):
    from napari_tiled_unet.core.metrics import match_objects
    from napari_tiled_unet.core.modelfile import load_model
    from napari_tiled_unet.core.postprocess import MIN_SIZES, THRESHOLDS, label_boundary_plane
    from napari_tiled_unet.core.predict import predict_array

    images, labels = annotated_files(tmp_path, seeds=range(2), size=80)
    model_path = tmp_path / "b.safetensors"
    assert (
        cli.main(
            [
                "train",
                "--images",
                *map(str, images),
                "--labels",
                *map(str, labels),
                "-o",
                str(model_path),
                "--mode",
                "boundary",
                "--iterations",
                "3",
                "--patch",
                "92",
                "--depth",
                "2",
                "--base-channels",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    model = load_model(model_path)
    assert model.config.n_classes == 3 and model.metadata["diameter"] > 0
    assert (
        cli.main(
            ["tune", str(model_path), "--images", *map(str, images), "--labels", *map(str, labels)]
        )
        == 0
    )
    chosen = load_model(model_path).metadata["postprocess"]
    assert chosen["split"] == 0  # the 3-class decoder splits by its own seeds
    classes = [predict_array(model, tifffile.imread(p), output="classes") for p in images]
    truths = [tifffile.imread(p) for p in labels]
    grid = {
        (t, s): np.mean(
            [
                match_objects(label_boundary_plane(c, t, s), g, 0.5).ap
                for c, g in zip(classes, truths)
            ]
        )
        for t in THRESHOLDS
        for s in MIN_SIZES
    }
    assert chosen["ap50"] == pytest.approx(max(grid.values()), abs=1e-12)
    out = tmp_path / "labels.tif"
    assert (
        cli.main(["segment", str(images[0]), "-o", str(out), "--model", str(model_path), "--quiet"])
        == 0
    )
    expected = label_boundary_plane(classes[0], chosen["threshold"], chosen["min_size"])
    assert np.array_equal(tifffile.imread(out), expected)
    split = ["--split", "2", "--overwrite", "--quiet"]
    assert cli.main(["segment", str(images[0]), "-o", str(out), "--model", str(model_path), *split])
    assert "split: expected 0 for a boundary-mode model" in capsys.readouterr().err
    assert np.array_equal(tifffile.imread(out), expected)


def test_zoom_range_is_checked_before_work(tmp_path, capsys):
    images, labels = annotated_files(tmp_path, seeds=range(1), size=64)
    code = cli.main(
        [
            "train",
            "--images",
            str(images[0]),
            "--labels",
            str(labels[0]),
            "-o",
            str(tmp_path / "m.safetensors"),
            "--zoom",
            "2",
            "0.5",
        ]
    )
    assert code == 2 and "--zoom: expected 0 < LOW <= HIGH, got 2.0 0.5" in capsys.readouterr().err


def test_measure_writes_a_table_of_every_object_of_every_plane(tmp_path, model_file, stack_file):
    import csv

    from napari_tiled_unet.core.measure import measure_plane
    from napari_tiled_unet.core.modelfile import load_model
    from napari_tiled_unet.core.predict import predict_array

    out = tmp_path / "labels.tif"
    median = float(np.median(predict_array(load_model(model_file), tifffile.imread(stack_file))))
    assert (
        segment(
            stack_file,
            "-o",
            out,
            "--model",
            model_file,
            "--measure",
            "--threshold",
            f"{median:.6f}",
        )
        == 0
    )
    labels, image = tifffile.imread(out), tifffile.imread(stack_file)
    with open(tmp_path / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(int(p.max()) for p in labels) > 0
    first = [r for r in rows if r["plane"] == "1"]
    expected = measure_plane(labels[1], image[1])
    assert [int(r["label"]) for r in first] == list(expected["label"])
    assert [int(float(r["area"])) for r in first] == list(expected["area"])
    assert np.allclose([float(r["mean_intensity"]) for r in first], expected["mean_intensity"])
    assert np.allclose([float(r["centroid-1"]) for r in first], expected["centroid-1"])
    assert not list(tmp_path.glob(".*.partial"))


def test_link_z_gives_one_id_per_nucleus_through_a_z_stack(tmp_path, model_file):
    from napari_tiled_unet.core.modelfile import load_model
    from napari_tiled_unet.core.postprocess import ZLinker
    from napari_tiled_unet.core.predict import predict_array

    from .synthetic import touching_blobs

    plane = touching_blobs(5, size=96, pairs=1, singles=3)[0]
    stack = np.stack([plane, np.roll(plane, 1, axis=1), np.roll(plane, 2, axis=1)])
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "ZYX"})
    model = load_model(model_file)
    threshold = round(float(np.quantile(predict_array(model, stack), 0.8)), 6)
    out = tmp_path / "linked.tif"
    assert (
        cli.main(
            [
                "segment",
                str(path),
                "-o",
                str(out),
                "--model",
                str(model_file),
                "--quiet",
                "--link-z",
                "0.5",
                "--threshold",
                f"{threshold:.6f}",
            ]
        )
        == 0
    )
    linked = tifffile.imread(out)
    from napari_tiled_unet.core.segment import segment

    linker = ZLinker(0.5)
    expected = [
        linker.link(p.labels) for e in segment(model, stack, threshold=threshold) for p in e.planes
    ]
    assert np.array_equal(linked, np.stack(expected)) and linked.max() > 0
    flat = tmp_path / "t.tif"
    tifffile.imwrite(flat, stack, metadata={"axes": "TYX"})
    assert (
        cli.main(
            [
                "segment",
                str(flat),
                "-o",
                str(tmp_path / "x.tif"),
                "--model",
                str(model_file),
                "--link-z",
                "0.5",
            ]
        )
        == 2
    )


def test_input_errors_are_one_line_and_bugs_show_their_traceback(tmp_path, capsys, monkeypatch):
    from napari_tiled_unet import cli
    from napari_tiled_unet.core import segment as segment_module

    image = tmp_path / "in.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.uint8))
    args = ["segment", str(image), "-o", str(tmp_path / "out.tif"), "--tile", "-3", "--quiet"]
    assert cli.main(args) == 2
    assert (
        capsys.readouterr().err
        == "tiled-unet segment: error: --tile: expected a positive integer or 'auto', got '-3'\n"
    )
    with pytest.raises(ValueError, match="--tile"):
        cli.main(["--debug", *args])

    def broken(*_, **__):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(segment_module, "segment", broken)
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        cli.main(["segment", str(image), "-o", str(tmp_path / "out.tif"), "--quiet"])


def test_a_planar_rgb_file_is_averaged_to_grey_with_a_message_and_none_keeps_the_planes(
    tmp_path, model_file, rng, capsys
):
    """The one colour rule (core.channels): what tifffile writes for a (3, Y, X) array is RGB
    samples; a one-channel model sees their mean, and --channel-axis none segments each
    colour as a plane."""
    from napari_tiled_unet.core.postprocess import instance_labels
    from napari_tiled_unet.core.predict import predict_array

    rgb = rng.integers(0, 255, (3, 60, 70), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", planarconfig="separate")
    assert segment(tmp_path / "rgb.tif", "-o", tmp_path / "grey.tif", "--model", model_file) == 0
    said = capsys.readouterr().err
    assert "rgb.tif: image: the colours on axis 0 (RGB) were averaged to grey" in said
    assert "pass --channel-axis none to segment each colour as a plane" in said
    grey = rgb.mean(axis=0, dtype=np.float32)
    expected = instance_labels(predict_array(load_model(model_file), grey), 0.5, 0)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "grey.tif"), expected)
    assert (
        segment(
            tmp_path / "rgb.tif",
            "-o",
            tmp_path / "planes.tif",
            "--model",
            model_file,
            "--channel-axis",
            "none",
        )
        == 0
    )
    assert tifffile.imread(tmp_path / "planes.tif").shape == (3, 60, 70)


@pytest.mark.parametrize("fine_tuning", [False, True, "resumed"])
def test_train_takes_its_defaults_from_the_core_presets(
    tmp_path, model_file, monkeypatch, fine_tuning
):
    from napari_tiled_unet.core import train as train_module
    from napari_tiled_unet.core.presets import FINE_TUNE, SCRATCH, SCRATCH_ARCHITECTURE

    from .synthetic import touching_blobs

    if fine_tuning == "resumed":  # a fine-tuning run stopped at once: its checkpoint says so
        sample = train_module.Sample(*touching_blobs(0, size=96))
        config = train_module.TrainConfig(iterations=5, patch=92, batch=1, device="cpu")
        output = tmp_path / "m.safetensors"
        list(
            train_module.train(
                [sample], output, config=config, init=model_file, should_stop=lambda: True
            )
        )
    seen = {}

    class Captured(Exception):
        pass

    def fake_train(samples, output, config, model_config, init, mode, resume, should_stop):
        seen.update(config=config, model_config=model_config, mode=mode)
        raise Captured

    monkeypatch.setattr(train_module, "train", fake_train)
    images, labels = annotated_files(tmp_path, [0], 96)
    args = ["train", "--images", *images, "--labels", *labels, "-o", tmp_path / "m.safetensors"]
    args += {False: [], True: ["--init", model_file], "resumed": ["--resume"]}[fine_tuning]
    with pytest.raises(Captured):
        cli.main([str(a) for a in args] + ["--quiet"])
    preset = FINE_TUNE if fine_tuning else SCRATCH
    config = seen["config"]
    assert (
        config.iterations,
        config.lr,
        config.lr_schedule,
        config.validate_every,
        config.anchor,
    ) == (preset.iterations, preset.lr, preset.lr_schedule, preset.validate_every, preset.anchor)
    if not fine_tuning:
        assert seen["model_config"].depth == SCRATCH_ARCHITECTURE.depth
        assert seen["model_config"].base_channels == SCRATCH_ARCHITECTURE.base_channels
        assert seen["model_config"].norm == SCRATCH_ARCHITECTURE.norm == "batch"
        assert seen["model_config"].output_mode == "paper"
    else:
        assert seen["model_config"] is None
    assert seen["mode"] is None  # a fine-tuned model keeps its --init's outputs
    assert train_module.TrainConfig().lr == SCRATCH.lr
    assert train_module.TrainConfig.fine_tuning(seed=3).lr_schedule == FINE_TUNE.lr_schedule


def test_train_rebuilds_the_outputs_of_its_init_model_for_another_mode(
    tmp_path, model_file, capsys
):
    images, labels = annotated_files(tmp_path, [0], 96)
    output = tmp_path / "d.safetensors"
    args = ["train", "--images", *images, "--labels", *labels, "-o", output, "--init", model_file]
    args += ["--mode", "distance", "--iterations", "2", "--validate-every", "2", "--patch", "92"]
    assert cli.main([str(a) for a in args] + ["--batch", "1", "--device", "cpu", "--quiet"]) == 0
    start, tuned = load_model(model_file), load_model(output)
    assert tuned.config == replace(start.config, n_classes=3, mode="distance")
    # two iterations leave the new output at about 0: no seeds, so the start is kept and named
    assert (
        f"warning: fine-tuning did not beat its start ({model_file} with new distance outputs; "
        f"they find nothing until trained: more --iterations or a higher --lr) on the validation "
        f"data (AP@0.5 0.000"
    ) in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value", [("--depth", "3"), ("--base-channels", "16"), ("--norm", "none")]
)
def test_train_refuses_architecture_options_with_init(tmp_path, model_file, option, value, capsys):
    images, labels = annotated_files(tmp_path, [0], 96)
    args = ["train", "--images", *images, "--labels", *labels, "-o", tmp_path / "m.safetensors"]
    args += ["--init", model_file, option, value]
    assert cli.main([str(a) for a in args]) == 2
    assert (
        f"{option}: the network comes from --init ({model_file}); expected no {option} with "
        f"--init, got {value}"
    ) in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_train_resumes_with_its_own_architecture_and_refuses_another(tmp_path, capsys):
    images, labels = annotated_files(tmp_path, [0], 96)
    output = tmp_path / "m.safetensors"
    args = ["train", "--images", *images, "--labels", *labels, "-o", output, "--depth", "2"]
    args += ["--base-channels", "4", "--norm", "none", "--mode", "boundary", "--iterations", "2"]
    run = [*args, "--validate-every", "2", "--patch", "92", "--batch", "1", "--device", "cpu"]
    assert cli.main([str(a) for a in run] + ["--quiet"]) == 0
    written = output.read_bytes()
    for option, value, held in (
        ("--depth", "3", "2"),
        ("--base-channels", "16", "4"),
        ("--norm", "batch", "none"),
        ("--mode", "paper", "boundary"),
    ):
        again = [*run, "--resume", "--iterations", "4"]
        again[again.index(option) + 1] = value
        assert cli.main([str(a) for a in again]) == 2
        assert (
            f"{option}: the run being resumed ({output}) has {held}; expected {held} or no "
            f"{option} with --resume, got {value}"
        ) in capsys.readouterr().err
        assert output.read_bytes() == written
    # the same command again, --resume added, goes on
    assert cli.main([str(a) for a in [*run, "--resume", "--iterations", "4"]] + ["--quiet"]) == 0
    assert load_model(output).metadata["trained_iterations"] == 4


@pytest.mark.parametrize("how", ["--init", "--mode paper", "--resume"])
def test_train_warns_when_fine_tuning_kept_its_starting_model(
    tmp_path, model_file, monkeypatch, capsys, how
):
    from napari_tiled_unet.core import train as train_module

    start = {"ap50": 0.62, "iou": 0.7, "f1": 0.7, "iteration": 0}
    data = train_module.DataSummary(1, 5, 1, 5, held_out=False)

    def kept_start(samples, output, config, model_config, init, mode, resume, should_stop):
        yield train_module.TrainEvent(500, 500, 0.1, start, start, 9.0, data=data, baseline=start)

    monkeypatch.setattr(train_module, "train", kept_start)
    images, labels = annotated_files(tmp_path, [0], 96)
    output = tmp_path / "m.safetensors"
    args = ["train", "--images", *images, "--labels", *labels, "-o", output]
    args += {
        "--init": ["--init", model_file],
        "--mode paper": ["--init", model_file, "--mode", "paper"],  # the model's own mode
        "--resume": ["--resume"],  # a resumed run is named by what it is, not by --init
    }[how]
    assert cli.main([str(a) for a in args] + ["--quiet"]) == 0
    said = capsys.readouterr().err
    assert "validating on the same objects (nothing could be held out)" in said
    start_name = "its starting model" if how == "--resume" else model_file
    assert (
        f"warning: fine-tuning did not beat {start_name} on the validation data (AP@0.5 0.620, "
        f"pixel IoU 0.700; it takes a higher AP@0.5, or pixel IoU up by 0.013 (0.03 / sqrt of "
        f"its 5 validation objects), and lower on neither); {output} holds that starting model"
    ) in said
