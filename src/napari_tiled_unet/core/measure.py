"""Per-object measurements of a labelled plane (scikit-image's ``regionprops_table``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def measure_plane(labels: np.ndarray, intensity: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Label, area (px), centroid (y, x), bounding box and mean intensity of every object.

    Parameters
    ----------
    labels : numpy.ndarray of int, shape (Y, X)
    intensity : numpy.ndarray, shape (Y, X) or (C, Y, X), optional
        The image; one ``mean_intensity`` column per channel (``-0``, ``-1``, ... with several).

    Returns
    -------
    dict of column name -> numpy.ndarray, one entry per object, in label order
    """
    from skimage.measure import regionprops_table

    properties = ["label", "area", "centroid", "bbox"]
    image = None
    if intensity is not None:
        intensity = np.asarray(intensity)
        image = np.moveaxis(intensity, 0, -1) if intensity.ndim == 3 else intensity
        if image.shape[:2] != labels.shape:
            raise ValueError(
                f"intensity: expected the labels' shape {labels.shape}, got {intensity.shape}"
            )
        properties.append("intensity_mean")
    table = regionprops_table(np.asarray(labels), intensity_image=image, properties=properties)
    return {
        name.replace("intensity_mean", "mean_intensity"): values for name, values in table.items()
    }


class MeasurementTable:
    """The measurements of every plane of a stack, one row per object, gathered as planes
    arrive: streamed to a CSV (written under a temporary name, renamed by :meth:`commit`) and,
    with ``keep``, also held as columns (for a napari layer's ``features``).

    Parameters
    ----------
    image : array-like, shape (..., [C,] Y, X)
        The intensities measured under each object.
    channel_axis : int or None
    path : Path, optional
        The CSV to write.
    keep : bool
        Keep the rows in memory (:attr:`columns`).
    """

    def __init__(self, image, channel_axis: int | None, path=None, keep: bool = False):
        import os

        self.image, self.channel_axis, self.keep = image, channel_axis, keep
        self.columns: dict[str, list] = {}
        self.path: Path | None = None
        self._tmp: Path | None = None
        self._handle = None
        self._writer: Any = None
        if path is not None:
            self.path = Path(path)
            self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
            self._handle = open(self._tmp, "w", newline="")  # noqa: SIM115 (open while planes arrive)

    def add(self, index: int, lead: tuple, labels: np.ndarray) -> None:
        """Measure one plane: ``index`` its C-order number, ``lead`` its leading index."""
        import csv

        measured = measure_plane(labels, self._intensity(lead))
        columns = {"plane": np.full(len(measured["label"]), index), **measured}
        if self.keep:
            for name, values in columns.items():
                self.columns.setdefault(name, []).extend(values.tolist())
        if self._handle is not None:
            if self._writer is None:
                self._writer = csv.writer(self._handle)
                self._writer.writerow(columns)
            self._writer.writerows(zip(*columns.values()))

    def _intensity(self, lead):
        from .predict import PlaneView

        plane = np.asarray(PlaneView(self.image, lead, self.channel_axis)[:, :, :])
        return plane if self.channel_axis is not None else plane[0]

    def commit(self) -> None:
        """Close the CSV and give it its name."""
        import os

        self.close()
        if self._tmp is not None and self.path is not None:
            os.replace(self._tmp, self.path)

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()

    def discard(self) -> None:
        """Close and remove the temporary CSV (an unfinished run leaves no file)."""
        self.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
