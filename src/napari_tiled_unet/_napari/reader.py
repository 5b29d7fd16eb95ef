"""napari reader for the OME-Zarr stores that ``tiled-unet segment -o OUT.zarr`` writes."""

from __future__ import annotations

from pathlib import Path


def get_reader(path):
    """The reader for a finished napari-tiled-unet store, else None (other readers then try)."""
    if isinstance(path, list) or not _is_store(Path(path)):
        return None
    return read_store


def _is_store(path: Path) -> bool:
    from ..core.distributed import is_finished_store

    return path.suffix.lower() == ".zarr" and is_finished_store(path)


def read_store(path) -> list[tuple]:
    """Layer data: the labels (a Labels layer) and, when stored, the probabilities (an Image
    layer), both lazy dask arrays read chunk by chunk as napari shows them."""
    from ..core.distributed import open_store

    arrays = open_store(Path(path))
    name = Path(path).stem
    layers = []
    if arrays["probabilities"] is not None:
        layers.append(
            (
                arrays["probabilities"],
                {"name": f"{name} probabilities", "contrast_limits": (0.0, 1.0)},
                "image",
            )
        )
    layers.append((arrays["labels"], {"name": f"{name} labels"}, "labels"))
    return layers
