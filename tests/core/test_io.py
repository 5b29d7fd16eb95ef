import numpy as np
import pytest
import tifffile

from napari_tiled_unet.core.io import (
    IncompleteWrite,
    read_tiff,
    write_tiff_stream,
    write_tiff_streams,
)


def test_contiguous_tiff_is_memory_mapped_and_compressed_one_read_lazily(tmp_path, rng):
    stack = rng.integers(0, 4000, (3, 40, 50), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "plain.tif", stack, metadata={"axes": "ZYX"}, photometric="minisblack"
    )
    tifffile.imwrite(
        tmp_path / "zlib.tif",
        stack,
        compression="zlib",
        metadata={"axes": "ZYX"},
        photometric="minisblack",
    )
    plain, packed = read_tiff(tmp_path / "plain.tif"), read_tiff(tmp_path / "zlib.tif")
    assert isinstance(plain.data, np.memmap)
    assert not isinstance(packed.data, np.ndarray)
    for image in (plain, packed):
        assert image.axes == "ZYX" and image.channel_axis is None
        assert (np.asarray(image.data[1, 5:9]) == stack[1, 5:9]).all()


def test_axes_from_imagej_and_rgb_metadata_put_y_x_last(tmp_path):
    tifffile.imwrite(
        tmp_path / "ij.tif",
        np.zeros((2, 3, 2, 10, 12), np.uint16),
        imagej=True,
        metadata={"axes": "TZCYX"},
    )
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((10, 12, 3), np.uint8), photometric="rgb")
    imagej, rgb = read_tiff(tmp_path / "ij.tif"), read_tiff(tmp_path / "rgb.tif")
    assert (imagej.axes, imagej.channel_axis, imagej.shape) == ("TZCYX", 2, (2, 3, 2, 10, 12))
    assert (rgb.axes, rgb.channel_axis, rgb.shape) == ("SYX", 0, (3, 10, 12))


def test_missing_foreign_and_truncated_files_give_clear_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="input: no such file"):
        read_tiff(tmp_path / "missing.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="input: expected a TIFF file"):
        read_tiff(tmp_path / "notes.txt")
    tifffile.imwrite(
        tmp_path / "full.tif",
        rng.integers(0, 9, (4, 64, 64), dtype=np.uint16),
        photometric="minisblack",
    )
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="input: TIFF file is truncated"):
        read_tiff(tmp_path / "cut.tif")


def test_streamed_stack_keeps_shape_and_axes(tmp_path):
    planes = (np.full((5, 6), i, np.uint16) for i in range(6))
    write_tiff_stream(tmp_path / "s.tif", (2, 3, 5, 6), np.uint16, "TZYX", planes)
    image = read_tiff(tmp_path / "s.tif")
    assert image.axes == "TZYX" and image.shape == (2, 3, 5, 6)
    assert np.asarray(image.data)[1, 2, 0, 0] == 5


def test_an_early_end_or_error_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "labels.tif"
    target.write_bytes(b"previous result")

    def failing():
        yield np.zeros((5, 6)), np.zeros((5, 6))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_tiff_streams(
            [
                (target, (3, 5, 6), np.uint16, "ZYX"),
                (tmp_path / "p.tif", (3, 5, 6), np.float32, "ZYX"),
            ],
            failing(),
        )
    with pytest.raises(IncompleteWrite):
        write_tiff_stream(target, (3, 5, 6), np.uint16, "ZYX", [np.zeros((5, 6))])
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_a_failing_writer_ends_the_run_at_once_and_commits_nothing(tmp_path):
    """A writer error (disk full, wrong plane) used to hang: the other writers kept waiting."""
    import threading

    labels, probabilities = tmp_path / "labels.tif", tmp_path / "prob.tif"
    labels.write_bytes(b"old labels")
    probabilities.write_bytes(b"old probabilities")
    rows = ((np.zeros((4, 4)), np.zeros((5, 6))) for _ in range(3))  # labels planes mis-shaped
    outcome = []

    def run():
        try:
            write_tiff_streams(
                [
                    (labels, (3, 5, 6), np.uint16, "ZYX"),
                    (probabilities, (3, 5, 6), np.float32, "ZYX"),
                ],
                rows,
            )
        except ValueError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "write_tiff_streams hung after a writer error"
    assert outcome and "plane 0: expected shape (5, 6), got (4, 4)" in outcome[0]
    assert labels.read_bytes() == b"old labels"
    assert probabilities.read_bytes() == b"old probabilities"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "prob.tif"]


def test_outputs_commit_together_only_when_every_file_is_complete(tmp_path, monkeypatch):
    from napari_tiled_unet.core import io

    real = io._TiffTarget.write

    def probabilities_fail(self, planes):
        if self.path.name == "prob.tif":
            for _ in planes:
                raise OSError(28, "No space left on device")
        return real(self, planes)

    monkeypatch.setattr(io._TiffTarget, "write", probabilities_fail)
    labels = tmp_path / "labels.tif"
    labels.write_bytes(b"old labels")
    rows = [(np.ones((5, 6)), np.ones((5, 6)))] * 3
    with pytest.raises(OSError, match="No space left"):
        write_tiff_streams(
            [
                (labels, (3, 5, 6), np.uint16, "ZYX"),
                (tmp_path / "prob.tif", (3, 5, 6), np.float32, "ZYX"),
            ],
            rows,
        )
    assert labels.read_bytes() == b"old labels"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_stream_writing_round_trips_several_files(tmp_path):
    import tifffile

    rows = [(np.full((5, 6), k, np.uint16), np.full((5, 6), k / 10, np.float32)) for k in range(4)]
    written = write_tiff_streams(
        [
            (tmp_path / "a.tif", (2, 2, 5, 6), np.uint16, "TZYX", True),
            (tmp_path / "b.tif", (2, 2, 5, 6), np.float32, "TZYX"),
        ],
        rows,
    )
    assert written == [tmp_path / "a.tif", tmp_path / "b.tif"]
    a, b = tifffile.imread(written[0]), tifffile.imread(written[1])
    assert a.shape == (2, 2, 5, 6) and [int(p[0, 0]) for p in a.reshape(4, 5, 6)] == [0, 1, 2, 3]
    assert np.allclose(b.reshape(4, 5, 6)[:, 0, 0], [0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="more planes than its shape"):
        write_tiff_streams([(tmp_path / "c.tif", (2, 5, 6), np.uint16, "ZYX")], rows)
    assert not (tmp_path / "c.tif").exists()


def test_a_file_that_appears_during_a_run_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "labels.tif"

    def rows():
        yield (np.zeros((5, 6)),)
        target.write_bytes(b"another run got here first")
        yield (np.zeros((5, 6)),)

    with pytest.raises(FileExistsError, match="appeared during the run"):
        write_tiff_streams([(target, (2, 5, 6), np.uint16, "ZYX")], rows(), overwrite=False)
    assert target.read_bytes() == b"another run got here first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_partials_of_dead_processes_are_cleaned_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from napari_tiled_unet.core.io import remove_stale_partials

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = tmp_path / f".labels.tif.{dead}.0123abcd.partial"
    live = tmp_path / f".labels.tif.{os.getpid()}.4567cdef.partial"
    other = tmp_path / f".other.tif.{dead}.89abcdef.partial"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_stale_partials(tmp_path / "labels.tif") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_pyramid_is_read_at_full_resolution(tmp_path):
    import tifffile

    image = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, tile=(32, 32), compression="zlib", metadata={"axes": "YX"})
        tif.write(image[::2, ::2], subfiletype=1, tile=(32, 32), compression="zlib")
    lazy = read_tiff(path)
    assert lazy.shape == (64, 80) and np.array_equal(np.asarray(lazy.data), image)


def test_several_series_need_a_choice_and_the_choice_is_read(tmp_path):
    import tifffile

    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((10, 12), np.uint8), metadata=None)
        tif.write(np.ones((20, 30), np.uint8), metadata=None)
    with pytest.raises(
        ValueError,
        match=r"holds 2 image series \(0: \(10, 12\) YX, 1: \(20, 30\) YX\); choose one with --series N",
    ):
        read_tiff(path)
    second = read_tiff(path, series=1)
    assert second.shape == (20, 30) and int(np.asarray(second.data).min()) == 1
    with pytest.raises(ValueError, match=r"series: expected an index in \[0, 1\]"):
        read_tiff(path, series=2)
