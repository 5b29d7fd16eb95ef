"""Sample data for napari's File > Open Sample menu: real nuclei images with their annotation."""

from __future__ import annotations

from importlib import resources

import tifffile


def nuclei_a() -> list:
    """520x696 fluorescence nuclei (272 annotated, many touching) with their instance labels."""
    return _image_and_labels("nuclei_a", "nuclei A")


def nuclei_b() -> list:
    """256x256 fluorescence nuclei (27 annotated) with their instance labels."""
    return _image_and_labels("nuclei_b", "nuclei B")


def nuclei_c() -> list:
    """520x696 fluorescence nuclei (206 annotated) that the bundled model never saw in training."""
    return _image_and_labels("nuclei_c", "nuclei C")


def _image_and_labels(stem: str, name: str) -> list:
    folder = resources.files("napari_tiled_unet.sample_data")
    with resources.as_file(folder / f"{stem}_image.tif") as path:
        image = tifffile.imread(path)
    with resources.as_file(folder / f"{stem}_labels.tif") as path:
        labels = tifffile.imread(path)
    return [
        (image, {"name": name}, "image"),
        (labels, {"name": f"{name} annotation", "opacity": 0.5}, "labels"),
    ]
