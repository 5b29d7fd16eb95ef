"""The widgets as a user meets them: added through the manifest to a real viewer (virtual display)."""

import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from napari_tiled_unet._napari import segment_widget as segment_module
from napari_tiled_unet._napari import train_widget as train_module
from napari_tiled_unet._napari._session import SESSION_MODELS
from napari_tiled_unet.core.modelfile import load_model, save_model
from napari_tiled_unet.core.postprocess import instance_labels
from napari_tiled_unet.core.predict import predict_array

from ..conftest import make_model
from ..synthetic import touching_blobs

PLUGIN = "napari-tiled-unet"


@pytest.fixture
def model_file(tmp_path):
    return save_model(make_model(depth=2, base_channels=4, seed=3), tmp_path / "tiny.safetensors")


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def errors(monkeypatch):
    """Messages the widgets show as error notifications."""
    shown = []
    monkeypatch.setattr(segment_module, "show_error", shown.append)
    monkeypatch.setattr(train_module, "show_error", shown.append)
    return shown


def segment_widget(viewer, model_file):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment (U-Net)")
    widget.select_model(model_file)
    return widget


def expected_labels(model_file, image):
    return instance_labels(predict_array(load_model(model_file), image), 0.5, 0)


def run_and_wait(qtbot, widget, timeout=60_000):
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_segment_2d_image_gives_labels_placed_like_the_image(viewer, qtbot, model_file, rng):
    image = rng.random((70, 90)).astype(np.float32)
    viewer.add_image(image, name="cells", scale=(0.5, 0.25), translate=(10.0, -4.0))
    widget = segment_widget(viewer, model_file)
    run_and_wait(qtbot, widget)
    labels = viewer.layers["cells labels"]
    assert labels.data.shape == (70, 90)
    assert tuple(labels.scale) == (0.5, 0.25) and tuple(labels.translate) == (10.0, -4.0)
    np.testing.assert_array_equal(labels.data, expected_labels(model_file, image))


def test_segment_stack_and_a_second_run_replaces_the_result(viewer, qtbot, model_file, rng):
    stack = rng.random((3, 40, 50)).astype(np.float32)
    viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5), translate=(1.0, 2.0, 3.0))
    widget = segment_widget(viewer, model_file)
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == 2
    labels = viewer.layers["stack labels"]
    assert labels.data.shape == (3, 40, 50)
    assert tuple(labels.scale) == (2.0, 0.5, 0.5) and tuple(labels.translate) == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(labels.data, expected_labels(model_file, stack))
    widget._threshold.value = 0.9
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == 2 and viewer.layers["stack labels"] is labels
    np.testing.assert_array_equal(
        labels.data, instance_labels(predict_array(load_model(model_file), stack), 0.9, 0)
    )


def test_keep_earlier_results_adds_a_new_layer(viewer, qtbot, model_file, rng):
    viewer.add_image(rng.random((30, 30)).astype(np.float32), name="img")
    widget = segment_widget(viewer, model_file)
    run_and_wait(qtbot, widget)
    widget._keep.value = True
    run_and_wait(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["img", "img labels", "img labels [1]"]


def test_current_plane_scope_fills_only_that_plane(viewer, qtbot, model_file, rng):
    stack = rng.random((4, 32, 36)).astype(np.float32)
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 2)
    widget = segment_widget(viewer, model_file)
    widget._scope.value = "current plane"
    run_and_wait(qtbot, widget)
    labels = viewer.layers["stack labels"].data
    assert labels.shape == (4, 32, 36)
    np.testing.assert_array_equal(labels[2], expected_labels(model_file, stack[2]))
    assert not labels[[0, 1, 3]].any()


def test_lazy_stack_result_is_a_zarr_store_on_disk(viewer, qtbot, model_file, rng):
    stack = rng.random((2, 48, 40)).astype(np.float32)
    viewer.add_image(da.from_array(stack, chunks=(1, 48, 40)), name="lazy")
    widget = segment_widget(viewer, model_file)
    widget._probabilities.value = True
    run_and_wait(qtbot, widget)
    labels = viewer.layers["lazy labels"].data
    assert type(labels).__module__.startswith("zarr")
    np.testing.assert_array_equal(labels[:], expected_labels(model_file, stack))
    probability = viewer.layers["lazy probability"].data
    np.testing.assert_allclose(
        probability[:], predict_array(load_model(model_file), stack), atol=1e-5
    )


def test_multichannel_image_with_a_two_channel_model(viewer, qtbot, tmp_path, rng):
    path = save_model(
        make_model(depth=2, base_channels=4, in_channels=2), tmp_path / "two.safetensors"
    )
    image = rng.random((2, 36, 44)).astype(np.float32)
    viewer.add_image(image, name="two", channel_axis=None, scale=(9.0, 0.5, 0.5))
    widget = segment_widget(viewer, path)
    run_and_wait(qtbot, widget)
    labels = viewer.layers["two labels"]
    assert labels.data.shape == (36, 44) and tuple(labels.scale) == (0.5, 0.5)
    expected = instance_labels(predict_array(load_model(path), image, channel_axis=0), 0.5, 0)
    np.testing.assert_array_equal(labels.data, expected)


def start_a_long_run(viewer, qtbot, model_file, rng, name):
    """Segment a 400x400 image in many small tiles; return once the first tiles are done."""
    viewer.add_image(rng.random((400, 400)).astype(np.float32), name=name)
    widget = segment_widget(viewer, model_file)
    widget._tile.value = "48"
    widget.start()
    qtbot.waitUntil(lambda: widget._bar.started, timeout=30_000)
    return widget


def test_cancel_adds_no_layer_and_the_viewer_stays_usable(viewer, qtbot, model_file, rng):
    widget = start_a_long_run(viewer, qtbot, model_file, rng, "big")
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert [layer.name for layer in viewer.layers] == ["big"]
    widget._tile.value = "auto"
    run_and_wait(qtbot, widget)
    assert viewer.layers["big labels"].data.shape == (400, 400)


def test_result_goes_to_its_image_when_selection_and_names_change(viewer, qtbot, model_file, rng):
    first = rng.random((300, 260)).astype(np.float32)
    viewer.add_image(first, name="first", scale=(3.0, 3.0))
    other = viewer.add_image(rng.random((20, 30)).astype(np.float32), name="other")
    widget = segment_widget(viewer, model_file)
    widget._image.value = viewer.layers["first"]
    widget._tile.value = "48"
    widget.start()
    widget._image.value = other
    viewer.layers.selection = {other}
    viewer.layers["first"].name = "renamed"
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    labels = viewer.layers["first labels"]
    assert labels.data.shape == (300, 260) and tuple(labels.scale) == (3.0, 3.0)
    np.testing.assert_array_equal(labels.data, expected_labels(model_file, first))


def test_removing_the_image_during_a_run_stops_it(viewer, qtbot, model_file, rng, monkeypatch):
    """The warning comes after the removal event, from the stopped run (a notification inside
    napari's removal event crashed napari)."""
    shown = []
    monkeypatch.setattr(
        segment_module,
        "show_warning",
        lambda message: shown.append((message, "gone" in viewer.layers)),
    )
    widget = start_a_long_run(viewer, qtbot, model_file, rng, "gone")
    viewer.layers.remove("gone")
    assert shown == []  # nothing from inside the event
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert len(viewer.layers) == 0
    assert shown == [("image: layer 'gone' was removed; segmentation stopped", False)]


def test_bad_input_is_reported_before_any_work(viewer, qtbot, model_file, errors, tmp_path, rng):
    widget = segment_widget(viewer, model_file)
    widget.start()
    assert errors == ["image: no image layer to segment; open or select one"]
    viewer.add_image(rng.random((20, 20)).astype(np.float32), name="img")
    widget._tile.value = "0"
    widget.start()
    assert errors[-1] == "tile size: expected a positive integer or 'auto', got '0'"
    widget._tile.value = "auto"
    widget.select_model(tmp_path / "missing.safetensors")
    widget.start()
    assert errors[-1] == f"model: no such file: {tmp_path / 'missing.safetensors'}"
    assert not widget.running and len(viewer.layers) == 1


def test_a_wrong_model_file_is_a_notification_not_a_crash(viewer, qtbot, errors, tmp_path, rng):
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("not a model")
    viewer.add_image(rng.random((20, 20)).astype(np.float32), name="img")
    widget = segment_widget(viewer, not_a_model)
    widget.start()
    assert len(errors) == 1 and errors[0].startswith(
        "model: expected a napari-tiled-unet model file"
    )
    assert len(viewer.layers) == 1


def train_widget(viewer, tmp_path, iterations):
    image, labels = touching_blobs(seed=5, size=96)
    viewer.add_image(image, name="blobs")
    viewer.add_labels(labels, name="blobs annotation")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train (U-Net)")
    widget._iterations.value = iterations
    widget._patch.value = 188
    widget._batch.value = 1
    widget._output.value = tmp_path / "trained.safetensors"
    return widget


def test_train_plots_writes_a_model_and_offers_it_to_segment(viewer, qtbot, tmp_path, model_file):
    segment = segment_widget(viewer, model_file)
    widget = train_widget(viewer, tmp_path, iterations=6)
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_event.iteration == 6 and not widget.last_event.stopped
    assert widget.plot.losses and len(widget.plot.validations) == 6  # validate_every = 1 here
    assert widget.plot.updates >= 7
    model = load_model(tmp_path / "trained.safetensors")
    assert model.metadata["trained_iterations"] >= 1
    assert SESSION_MODELS.paths[0] == (tmp_path / "trained.safetensors").resolve()
    assert segment._model.value == SESSION_MODELS.paths[0]
    segment._image.value = viewer.layers["blobs"]
    run_and_wait(qtbot, segment)
    assert viewer.layers["blobs labels"].data.shape == (96, 96)


def test_stop_mid_training_keeps_a_loadable_model(viewer, qtbot, tmp_path):
    widget = train_widget(viewer, tmp_path, iterations=100_000)
    widget.start()
    qtbot.waitUntil(lambda: widget.last_event is not None, timeout=60_000)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert widget.last_event.stopped and widget.last_event.iteration < 100_000
    assert load_model(tmp_path / "trained.safetensors").config.depth == 3


def test_train_refuses_labels_of_another_shape(viewer, qtbot, tmp_path, errors):
    widget = train_widget(viewer, tmp_path, iterations=5)
    viewer.add_labels(np.zeros((50, 50), np.uint16), name="wrong")
    widget._labels_layer.value = viewer.layers["wrong"]
    widget.start()
    assert errors == [
        "labels: layer 'wrong' has shape (50, 50), expected the shape of image 'blobs' (96, 96)"
    ]
    assert not widget.running and not (tmp_path / "trained.safetensors").exists()


def test_train_without_annotations_is_reported(viewer, qtbot, tmp_path, errors):
    widget = train_widget(viewer, tmp_path, iterations=5)
    viewer.add_labels(np.zeros((96, 96), np.uint16), name="empty")
    widget._labels_layer.value = viewer.layers["empty"]
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert errors == ["labels: no annotated plane (every plane is empty or outside its region)"]


def test_sample_data_opens_image_and_annotation(viewer):
    viewer.open_sample(PLUGIN, "nuclei_b")
    image, labels = viewer.layers
    assert image.data.shape == labels.data.shape == (256, 256)
    assert labels.data.max() == 27


def test_manifest_validates():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", PLUGIN], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_loading_the_widget_modules_does_not_import_torch():
    code = (
        "import sys, napari_tiled_unet._napari.segment_widget, napari_tiled_unet._napari.train_widget,"
        " napari_tiled_unet._napari.sample_data; print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_train_widget_docked_before_any_labels_layer_shows_its_field_labels(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train (U-Net)")
    assert widget.labels is True  # magicgui's own flag, no longer shadowed by a layer field
    assert widget._labels_layer.label == "labels"


def test_segment_results_are_at_least_uint16_for_painting_new_ids(viewer, model_file, qtbot):
    image = touching_blobs(0, size=64, pairs=1, singles=1)[0]
    viewer.add_image(image, name="few")
    widget = segment_widget(viewer, model_file)
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    labels = viewer.layers["few labels"].data
    assert labels.dtype == np.uint16 and int(labels.max()) <= 255


def test_docking_the_widgets_and_opening_a_sample_leaves_torch_unimported():
    code = (
        "import sys, napari\n"
        "viewer = napari.Viewer(show=False)\n"
        f"viewer.window.add_plugin_dock_widget({PLUGIN!r}, 'Segment (U-Net)')\n"
        f"viewer.window.add_plugin_dock_widget({PLUGIN!r}, 'Train (U-Net)')\n"
        f"viewer.open_sample({PLUGIN!r}, 'nuclei_a')\n"
        "print(sorted(m for m in ('torch', 'safetensors.torch') if m in sys.modules))\n"
        "viewer.close()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_tile_tooltip_names_the_models_smallest_tile(viewer, model_file):
    widget = segment_widget(viewer, model_file)
    assert "at least 44 px" in widget._tile.tooltip  # depth 2: 4 px of output + 40 of margin


def test_object_diameter_defaults_to_auto_for_models_that_know_their_size(
    viewer, tmp_path, qtbot, monkeypatch, errors
):
    shown = []
    monkeypatch.setattr(segment_module, "show_info", shown.append)
    sized = save_model(
        make_model(depth=2, base_channels=4, seed=3),
        tmp_path / "sized.safetensors",
        metadata={"diameter": 14.0},
    )
    plain = save_model(make_model(depth=2, base_channels=4, seed=3), tmp_path / "plain.safetensors")
    viewer.add_image(touching_blobs(0, size=96)[0], name="blobs")
    widget = segment_widget(viewer, plain)
    assert widget._diameter.value == "none"
    widget.select_model(sized)
    assert widget._diameter.value == "auto"
    widget._diameter.value = "28"
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert not errors and viewer.layers["blobs labels"].data.shape == (96, 96)
    assert shown[-1].endswith("(object diameter 28 px, segmented at 0.5x)")
    widget._diameter.value = "-2"
    widget.start()
    assert errors and "object diameter: expected a positive number" in errors[-1]


def test_the_report_names_the_object_size_and_the_working_scale():
    assert segment_module._size_note(None) == ""
    assert segment_module._size_note((21.6, 1.0)) == " (object diameter 22 px, segmented as it is)"
    assert segment_module._size_note((60.0, 1 / 3)) == (
        " (object diameter 60 px, segmented at 0.333x)"
    )


def test_a_cluster_store_opens_as_probabilities_and_labels_layers(viewer, tmp_path, rng):
    """What `tiled-unet segment -o OUT.zarr` writes opens in napari through the plugin's reader,
    lazily (run here in this process, without a cluster)."""
    import tifffile

    from napari_tiled_unet.core import distributed

    model = make_model(depth=2, base_channels=4, seed=3)
    model.metadata = {}
    path = save_model(model, tmp_path / "m.safetensors")
    image, _ = touching_blobs(0, size=96)
    tifffile.imwrite(tmp_path / "in.tif", image)
    job = distributed.plan_job(
        path,
        tmp_path / "in.tif",
        tmp_path / "out.zarr",
        model=load_model(path),
        block=48,
        threshold=0.4,
        probabilities=True,
    )
    events = list(distributed.segment_on_cluster(job, distributed.InProcess()))
    layers = viewer.open(str(tmp_path / "out.zarr"), plugin=PLUGIN)
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    assert layers[1].data.shape == (96, 96)
    labels = np.asarray(layers[1].data)
    assert events[-1].objects >= 1 and len(np.unique(labels[labels > 0])) == events[-1].objects


def test_a_fine_tuning_that_kept_its_start_is_not_selected(viewer, tmp_path, monkeypatch):
    """What the run learns from is said first (a warning when it is too little); a fine-tuned
    model that scores below its start is not selected; one that finds nothing is, with a warning."""
    from napari_tiled_unet.core.train import DataSummary, TrainEvent

    shown = []
    monkeypatch.setattr(train_module, "show_warning", shown.append)
    monkeypatch.setattr(train_module, "show_info", shown.append)
    widget = train_widget(viewer, tmp_path, iterations=5)
    before = list(SESSION_MODELS.paths)
    (tmp_path / "trained.safetensors").write_bytes(b"model")
    widget._job = train_module.TrainJob(
        [], tmp_path / "trained.safetensors", None, init=None, in_channels=1, mode="paper"
    )
    data = DataSummary(1, 3, 1, 3, held_out=False)
    widget._bar = train_module.LazyProgress("Training")
    widget._on_event(TrainEvent(1, 5, 0.5, None, None, 1.0, data=data))
    assert shown == [
        "Training: training on 3 objects in 1 plane(s), validating on the same objects "
        "(nothing could be held out). The validation score will say little about new "
        "images: annotate more objects, or add another image."
    ]
    start = {"ap50": 0.62, "iou": 0.7, "iteration": 0}
    widget._on_returned(TrainEvent(5, 5, 0.1, None, start, 2.0, data=data, baseline=start))
    assert SESSION_MODELS.paths == before
    assert (
        "fine-tuning did not beat the model it started from on validation (AP@0.5 0.620, "
        "pixel IoU 0.700; it takes a higher AP@0.5, or pixel IoU up by 0.017 (0.03 / sqrt of its "
        "3 validation objects), and lower on neither)" in shown[-1]
    )
    widget._on_returned(TrainEvent(5, 5, 0.1, None, {"ap50": 0.0, "iou": 0.1}, 2.0, data=data))
    assert SESSION_MODELS.paths[0] == (tmp_path / "trained.safetensors").resolve()
    assert "It finds no validation object yet" in shown[-1]


def test_the_train_widget_shows_the_starts_output_and_trains_the_chosen_one(
    viewer, qtbot, tmp_path, model_file, monkeypatch
):
    from napari_tiled_unet.core.train import TrainEvent

    distance_file = save_model(
        make_model(depth=2, base_channels=4, n_classes=3, mode="distance"),
        tmp_path / "distance.safetensors",
    )
    widget = train_widget(viewer, tmp_path, iterations=3)
    assert list(widget._mode.choices) == ["paper", "boundary", "distance"]
    assert widget._mode.value == "paper"
    widget._start_from.value = "file"
    widget._init_file.value = distance_file
    assert widget._mode.value == "distance"
    widget._init_file.value = model_file
    assert widget._mode.value == "paper"
    widget._start_from.value = "scratch"
    widget._mode.value = "distance"
    widget._iterations.value = 3  # each start sets its preset's
    run_and_wait(qtbot, widget, timeout=120_000)
    trained = load_model(tmp_path / "trained.safetensors").config
    assert (trained.output_mode, trained.depth, trained.norm) == ("distance", 3, "batch")

    shown = []
    monkeypatch.setattr(train_module, "show_warning", shown.append)
    widget._start_from.value = "file"
    widget._init_file.value = model_file
    widget._mode.value = "distance"
    widget._iterations.value = 3
    widget._overwrite.value = True
    run_and_wait(qtbot, widget, timeout=120_000)
    tuned = load_model(tmp_path / "trained.safetensors").config
    assert (tuned.output_mode, tuned.depth, tuned.base_channels) == ("distance", 2, 4)
    start = {"ap50": 0.0, "iou": 0.0, "iteration": 0}
    widget._job = train_module.TrainJob(
        [], tmp_path / "trained.safetensors", None, model_file, in_channels=1, mode="distance"
    )
    widget._on_returned(TrainEvent(3, 3, 0.1, None, start, 1.0, baseline=start))
    assert (
        f"did not beat its start ({model_file} with new distance outputs; they find "
        "nothing until trained: more iterations or a higher learning rate) on validation"
    ) in shown[-1]


TRAIN_IN_A_FRESH_PROCESS = """
import sys
import numpy as np
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=False)          # the OpenGL context exists before torch is imported
yy, xx = np.mgrid[:96, :96]
labels = np.zeros((96, 96), np.uint16)
for i, (y, x) in enumerate([(30, 30), (30, 44), (70, 60)], start=1):
    labels[(yy - y) ** 2 + (xx - x) ** 2 < 64] = i
image = np.where(labels > 0, 200, 20).astype(np.uint8)
viewer.add_image(image, name="cells")
viewer.add_labels(labels, name="cells annotation")
_, widget = viewer.window.add_plugin_dock_widget("napari-tiled-unet", "Train (U-Net)")
assert "torch" not in sys.modules
widget._iterations.value, widget._patch.value, widget._batch.value = 3, 188, 1
widget._output.value = sys.argv[1]
widget.start()
app = QApplication.instance()
while widget.running:
    app.processEvents()
print("iterations", widget.last_event.iteration, "triton blocked", sys.modules.get("triton", 0) is None)
viewer.close()
"""


def test_train_works_in_a_fresh_process_whose_viewer_came_first(tmp_path):
    """Issue 14 #1: training crashed when torch first loaded after napari's OpenGL context
    (Mesa + the CUDA build's triton). Here nothing loads torch before the viewer exists."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_IN_A_FRESH_PROCESS)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("iterations 3 ")
    assert load_model(tmp_path / "m.safetensors").metadata["trained_iterations"] >= 1


def test_triton_is_kept_out_only_beside_mesas_llvm(monkeypatch):
    from napari_tiled_unet._napari._triton import keep_triton_out

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert not keep_triton_out("7f00-7f10 r-xp 0 08:01 1 /usr/lib/libGL.so.1\n")
    assert "triton" not in sys.modules
    mesa = "7f00-7f10 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/dri/swrast_dri.so\n"
    assert keep_triton_out(mesa)
    with pytest.raises(ImportError):
        import triton  # noqa: F401


SAMPLE_FOLDER = Path(__file__).parents[2] / "sample_data"


def sample_image(name):
    import tifffile

    return tifffile.imread(SAMPLE_FOLDER / f"{name}_image.tif")


def test_link_z_and_measurements_on_a_sample_stack(viewer, qtbot, tmp_path, errors):
    """Three copies of a sample image as a Z stack, the bundled model: linked ids run through
    the stack, and every object of every plane is measured (layer features and a CSV)."""
    import pandas as pd

    from napari_tiled_unet.core.measure import measure_plane
    from napari_tiled_unet.models import DEFAULT_MODEL

    plane = sample_image("nuclei_b")
    viewer.add_image(np.stack([plane] * 3), name="z")
    widget = segment_widget(viewer, DEFAULT_MODEL)
    widget._diameter.value = "none"
    widget._link_z.value = 0.5
    widget._measure.value = True
    widget._table_file.value = tmp_path / "objects.csv"
    run_and_wait(qtbot, widget)
    assert not errors
    layer = viewer.layers["z labels"]
    labels = np.asarray(layer.data)
    count = len(np.unique(labels[0])) - 1
    assert count > 15
    np.testing.assert_array_equal(labels[1], labels[0])
    np.testing.assert_array_equal(labels[2], labels[0])
    table = layer.features
    assert len(table) == 3 * count and list(table["plane"].unique()) == [0, 1, 2]
    expected = measure_plane(labels[2], plane)
    last = table[table["plane"] == 2]
    np.testing.assert_array_equal(last["label"], expected["label"])
    np.testing.assert_allclose(last["mean_intensity"], expected["mean_intensity"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "objects.csv"), table, check_dtype=False)


def test_link_z_on_a_single_plane_is_refused_before_work(viewer, model_file, errors):
    viewer.add_image(np.zeros((40, 40), np.float32), name="flat")
    widget = segment_widget(viewer, model_file)
    widget._link_z.value = 0.5
    widget.start()
    assert not widget.running
    assert errors == [
        "link Z: expected a stack (a Z axis before Y, X); set it to 0 for a single plane"
    ]


def folder_of_samples(tmp_path):
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("nuclei_b", "nuclei_c"):
        shutil.copy(SAMPLE_FOLDER / f"{name}_image.tif", folder)
    return folder


def folder_widget(viewer, tmp_path, model):
    widget = segment_widget(viewer, model)
    widget._scope.value = "folder of files"
    widget._in_folder.value = folder_of_samples(tmp_path)
    widget._out_folder.value = tmp_path / "out"
    (tmp_path / "out").mkdir()
    return widget


def test_a_folder_is_segmented_into_a_folder_with_the_model_loaded_once(
    viewer, qtbot, tmp_path, monkeypatch, errors
):
    import tifffile

    from napari_tiled_unet.core import modelfile
    from napari_tiled_unet.core.segment import segment
    from napari_tiled_unet.models import DEFAULT_MODEL

    loads = []
    real_load = modelfile.load_model
    monkeypatch.setattr(modelfile, "load_model", lambda path: loads.append(path) or real_load(path))
    shown = []
    monkeypatch.setattr(segment_module, "show_info", shown.append)
    widget = folder_widget(viewer, tmp_path, DEFAULT_MODEL)
    assert not widget._in_folder.native.isHidden() and widget._image.native.isHidden()
    widget._diameter.value = "none"
    widget._measure.value = True
    run_and_wait(qtbot, widget)
    assert not errors and len(loads) == 1
    objects = 0
    model = real_load(DEFAULT_MODEL)
    for name in ("nuclei_b", "nuclei_c"):
        written = tifffile.imread(tmp_path / "out" / f"{name}_image_labels.tif")
        events = list(segment(model, sample_image(name), device="cpu"))
        expected = [p.labels for e in events for p in e.planes][0]
        np.testing.assert_array_equal(written, expected)
        rows = (tmp_path / "out" / f"{name}_image_labels.csv").read_text().splitlines()
        assert len(rows) - 1 == int(expected.max())
        objects += int(expected.max())
    assert shown[-1] == f"in: 2 files segmented, {objects} objects; labels in {tmp_path / 'out'}"


def test_a_folder_run_refuses_to_replace_labels_files_and_cancels_cleanly(
    viewer, qtbot, tmp_path, errors, monkeypatch
):
    shown = []
    monkeypatch.setattr(segment_module, "show_info", shown.append)
    from napari_tiled_unet.models import DEFAULT_MODEL

    widget = folder_widget(viewer, tmp_path, DEFAULT_MODEL)
    (tmp_path / "out" / "nuclei_c_image_labels.tif").write_bytes(b"earlier result")
    widget.start()
    assert not widget.running
    assert errors and errors[-1].startswith("output folder: ") and "exists" in errors[-1]
    widget._replace.value = True
    widget._job = None
    widget.start()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert shown[-1].startswith("Segmentation of folder 'in' cancelled")
    assert (tmp_path / "out" / "nuclei_c_image_labels.tif").read_bytes() == b"earlier result"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nuclei_c_image_labels.tif"]


def test_load_from_file_with_no_file_picked_says_so(viewer, errors):
    viewer.add_image(np.zeros((40, 40), np.float32), name="img")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment (U-Net)")
    widget._model.value = segment_module.FROM_FILE  # and no file picked
    widget.start()
    assert errors == ["model file: none picked; choose a .safetensors model file"]


def test_threshold_device_and_loss_weights_explain_themselves(viewer):
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment (U-Net)")
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train (U-Net)")
    assert "probability (0-1)" in segment._threshold.tooltip
    assert "CUDA" in segment._device.tooltip
    assert "(px" in segment._min_size.tooltip
    assert "paper: 10" in train._w0.tooltip and "(px)" in train._sigma.tooltip


def test_a_new_threshold_relabels_from_the_kept_maps_without_the_network(
    viewer, qtbot, model_file, monkeypatch, errors
):
    from napari_tiled_unet.core import predict as predict_module

    image = touching_blobs(2, size=96)[0]
    probability = predict_array(load_model(model_file), image)
    threshold = float(np.quantile(probability, 0.8))  # a threshold that surely changes the labels
    expected = instance_labels(probability, round(threshold, 2), 0)
    assert not np.array_equal(expected, instance_labels(probability, 0.5, 0))
    runs = []
    real_predict = predict_module.predict
    monkeypatch.setattr(
        predict_module, "predict", lambda *a, **k: runs.append(1) or real_predict(*a, **k)
    )
    viewer.add_image(image, name="blobs")
    widget = segment_widget(viewer, model_file)
    widget._min_size.value = 0
    run_and_wait(qtbot, widget)
    assert runs == [1]
    layer = viewer.layers["blobs labels"]
    widget._threshold.value = round(threshold, 2)
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert runs == [1] and not errors
    np.testing.assert_array_equal(layer.data, expected)
    assert viewer.layers["blobs labels"] is layer and len(viewer.layers) == 2


def test_the_neck_split_and_floor_come_from_the_model_and_relabel_without_the_network(
    viewer, qtbot, tmp_path, monkeypatch, errors
):
    from dataclasses import replace

    from napari_tiled_unet.core import segment as segment_core
    from napari_tiled_unet.core.postprocess import label_plane

    from ..synthetic import two_discs_and_a_neck

    recommended = {"threshold": 0.5, "min_size": 0, "split": 2, "min_peak": 0.875}
    path = save_model(
        make_model(depth=2, base_channels=4, seed=3),
        tmp_path / "split.safetensors",
        metadata={"postprocess": recommended},
    )
    given = []
    real_segment = segment_core.segment
    monkeypatch.setattr(
        segment_core,
        "segment",
        lambda *a, **k: given.append((k["split"], k["min_peak"])) or real_segment(*a, **k),
    )
    necks = two_discs_and_a_neck(width=3)
    viewer.add_image(necks, name="necks")
    widget = segment_widget(viewer, path)
    assert widget._split.value == 2 and widget._split.enabled
    assert widget._min_peak.value == 0.875
    run_and_wait(qtbot, widget)
    assert given == [(2, 0.875)] and not errors
    # the kept maps replaced by a known probability: what a relabel makes of them is exact
    widget._cache = replace(widget._cache, maps={(): necks})
    layer = viewer.layers["necks labels"]
    for split, objects in ((0, 1), (2, 2)):
        widget._split.value = split
        qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
        np.testing.assert_array_equal(layer.data, label_plane(necks, 0.5, 0, split))
        assert layer.data.max() == objects
    widget._min_peak.value = 0.925  # over the discs' 0.9: no object reaches it
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert widget._min_peak.value == 0.925 and layer.data.max() == 0
    assert given == [(2, 0.875)] and not errors
    three_class = save_model(make_model(n_classes=3), tmp_path / "boundary.safetensors")
    widget.select_model(three_class)  # splits objects from its own seeds
    assert widget._split.value == 0 and not widget._split.enabled


def test_an_rgb_layer_follows_the_command_lines_colour_rule(
    viewer, qtbot, model_file, rng, monkeypatch, errors
):
    shown = []
    monkeypatch.setattr(segment_module, "show_info", shown.append)
    rgb = rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)
    viewer.add_image(rgb, name="colour", rgb=True)
    widget = segment_widget(viewer, model_file)
    run_and_wait(qtbot, widget)
    assert not errors
    assert shown[0].startswith("image: the colours on axis 2 (RGB) were averaged to grey")
    grey = rgb.mean(axis=-1, dtype=np.float32)
    np.testing.assert_array_equal(
        viewer.layers["colour labels"].data, expected_labels(model_file, grey)
    )


def test_the_train_widget_starts_from_the_core_presets(viewer):
    from napari_tiled_unet.core.presets import FINE_TUNE, SCRATCH

    viewer.add_image(np.zeros((40, 40), np.float32), name="image")
    viewer.add_labels(np.zeros((40, 40), np.int32), name="labels")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train (U-Net)")
    assert (widget._lr.value, widget._iterations.value) == (SCRATCH.lr, SCRATCH.iterations)
    assert widget._job_from_form().config.anchor == SCRATCH.anchor == 0
    widget._start_from.value = "bundled default"
    assert (widget._lr.value, widget._iterations.value) == (FINE_TUNE.lr, FINE_TUNE.iterations)
    config = widget._job_from_form().config
    assert (config.anchor, config.lr_schedule) == (FINE_TUNE.anchor, FINE_TUNE.lr_schedule)
    assert FINE_TUNE.anchor > 0
    widget._start_from.value = "scratch"
    assert widget._lr.value == SCRATCH.lr


def test_an_error_inside_a_running_worker_reaches_the_user(viewer, qtbot, model_file, monkeypatch):
    """A NaN in a lazily read plane is found mid-run, in the worker: napari's worker relays
    it as an error notification, and the widget is ready for the next run."""
    from napari.utils.notifications import notification_manager

    received = []
    monkeypatch.setattr(
        notification_manager, "receive_error", lambda *a, **k: received.append(a[1])
    )
    stack = np.ones((3, 40, 40), np.float32)
    stack[2, 5, 5] = np.nan
    viewer.add_image(da.from_array(stack, chunks=(1, 40, 40)), name="lazy")
    widget = segment_widget(viewer, model_file)
    run_and_wait(qtbot, widget)
    assert [str(e) for e in received] == ["image: contains NaN or Inf values (plane (2,))"]
    assert widget._run.enabled and not widget._cancel.enabled and "lazy labels" not in viewer.layers
