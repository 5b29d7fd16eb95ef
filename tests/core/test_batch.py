"""The file step shared by the CLI and the Segment widget's folder mode."""

import numpy as np
import pytest
import tifffile

from napari_tiled_unet.core.batch import FileOutputs, batch_pairs, segment_file
from napari_tiled_unet.core.io import read_tiff
from napari_tiled_unet.core.segment import segment

from ..conftest import make_model


def test_batch_pairs_names_outputs_and_refuses_collisions(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"")
    (tmp_path / "b.TIFF").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert batch_pairs([tmp_path], tmp_path / "out") == [
        (tmp_path / "a.tif", tmp_path / "out" / "a_labels.tif"),
        (tmp_path / "b.TIFF", tmp_path / "out" / "b_labels.tif"),
    ]
    (tmp_path / "a_labels.tif").write_bytes(b"")  # an input that an output would replace
    with pytest.raises(ValueError, match=r"^output: .*a_labels.tif is an input of this run"):
        batch_pairs([tmp_path], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="^input: folder .* holds no .tif"):
        batch_pairs([empty], tmp_path / "out")
    with pytest.raises(ValueError, match="^input: two inputs share a name"):
        batch_pairs([tmp_path / "a.tif", empty / "a.tif"], tmp_path / "out")


@pytest.fixture
def stack_file(tmp_path, rng):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, rng.random((3, 40, 48)).astype(np.float32), metadata={"axes": "ZYX"})
    return path


def test_segment_file_writes_the_segment_steps_planes_linked_and_measured(tmp_path, stack_file):
    model = make_model(depth=2, base_channels=4, seed=3)
    outputs = FileOutputs(tmp_path / "l.tif", tmp_path / "p.tif", tmp_path / "l.csv")
    events = list(segment_file(model, read_tiff(stack_file), outputs, threshold=0.4, device="cpu"))
    assert events[-1].written and events[-1].planes == 3
    planes = [
        p for e in segment(model, tifffile.imread(stack_file), threshold=0.4) for p in e.planes
    ]
    np.testing.assert_array_equal(
        tifffile.imread(outputs.labels), np.stack([p.labels for p in planes])
    )
    np.testing.assert_allclose(
        tifffile.imread(outputs.probabilities), np.stack([p.probability for p in planes])
    )
    assert events[-1].objects == sum(p.count for p in planes)
    rows = outputs.table.read_text().splitlines()
    assert rows[0].startswith("plane,label,area,") and len(rows) - 1 == events[-1].objects


def test_a_stopped_file_run_writes_nothing(tmp_path, stack_file):
    model = make_model(depth=2, base_channels=4, seed=3)
    outputs = FileOutputs(tmp_path / "l.tif", table=tmp_path / "l.csv")
    events = list(segment_file(model, read_tiff(stack_file), outputs, should_stop=lambda: True))
    assert events[-1].stopped and not events[-1].written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.tif"]


def test_link_z_needs_a_z_axis_before_any_work(tmp_path, rng):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, rng.random((2, 40, 48)).astype(np.float32), metadata={"axes": "TYX"})
    with pytest.raises(
        ValueError, match=r"^link_z: expected a stack whose plane axis .* got axes 'TYX'"
    ):
        segment_file(make_model(), read_tiff(path), FileOutputs(tmp_path / "l.tif"), link_z=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tif"]
