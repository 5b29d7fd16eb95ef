"""Screenshots for the README: the viewer after Segment on the sample data, and the Train widget
after a short run. Needs a display (``xvfb-run -a python docs/make_screenshots.py``).

    python docs/make_screenshots.py [--iterations 100]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import napari
from napari._qt import qt_main_window
from qtpy.QtWidgets import QApplication

# napari's PyQt5 deprecation toast (a notification, not a Python warning) would cover the picture
qt_main_window.SHOW_QT_WARNING = False

IMAGES = Path(__file__).resolve().parent / "images"
PLUGIN = "napari-tiled-unet"


def wait_for(widget) -> None:
    while widget.running:
        QApplication.processEvents()


def segment_screenshot(viewer) -> None:
    viewer.open_sample(PLUGIN, "nuclei_a")
    viewer.layers["nuclei A annotation"].visible = False
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment (U-Net)")
    segment._image.value = viewer.layers["nuclei A"]
    segment.start()
    wait_for(segment)
    viewer.layers["nuclei A labels"].contour = 0
    viewer.reset_view()
    viewer.window.screenshot(str(IMAGES / "segment.png"), flash=False)


def train_screenshot(viewer, iterations: int, folder: Path) -> None:
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train (U-Net)")
    train._image.value = viewer.layers["nuclei A"]
    train._labels_layer.value = viewer.layers["nuclei A annotation"]
    train._start_from.value = "bundled default"  # fine-tuning: what most users will do
    train._iterations.value = iterations
    train._batch.value = 2
    train._output.value = folder / "nuclei_a.safetensors"
    train.start()
    wait_for(train)
    viewer.window.screenshot(str(IMAGES / "train.png"), flash=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer()
    viewer.window.resize(1500, 950)
    segment_screenshot(viewer)
    with tempfile.TemporaryDirectory() as scratch:
        train_screenshot(viewer, args.iterations, Path(scratch))
    viewer.close()


if __name__ == "__main__":
    main()
