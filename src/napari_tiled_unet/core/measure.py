"""Per-object measurements of a labelled plane (scikit-image's ``regionprops_table``)."""

from __future__ import annotations

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
            raise ValueError(f"intensity: expected the labels' shape {labels.shape}, got {intensity.shape}")
        properties.append("intensity_mean")
    table = regionprops_table(np.asarray(labels), intensity_image=image, properties=properties)
    return {name.replace("intensity_mean", "mean_intensity"): values for name, values in table.items()}
