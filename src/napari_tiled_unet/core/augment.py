"""Data augmentation on the training device (torch): elastic deformation as in the paper,
flips and 90-degree rotations, and intensity scale / shift / gamma.

Image, labels and weights are warped by one displacement field; labels and weights are sampled
nearest-neighbour, so ids stay ids and ignored pixels (weight 0) stay ignored exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Augmentation:
    """Augmentation settings.

    Attributes
    ----------
    elastic_sigma : float
        Standard deviation, in pixels, of the random displacements on the coarse grid (paper: 10).
    elastic_grid : int
        Points per side of the coarse displacement grid (paper: 3).
    flips_rotations : bool
        Random flips and multiples of 90-degree rotations.
    scale, shift, gamma : (float, float)
        Ranges of the intensity changes ``((x * scale + shift) ** gamma``, sign kept).
    zoom : (float, float)
        Range of the geometric scale factor (drawn log-uniformly): objects appear this many times
        their size, so that one model covers a range of object sizes. Applied when patches are
        cut (:func:`napari_tiled_unet.core.train`), from a window of ``patch / zoom`` pixels.
    """

    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    flips_rotations: bool = True
    scale: tuple[float, float] = (0.8, 1.2)
    shift: tuple[float, float] = (-0.1, 0.1)
    gamma: tuple[float, float] = (0.75, 1.33)
    zoom: tuple[float, float] = (0.5, 2.0)


NO_AUGMENTATION = Augmentation(0.0, 3, False, (1.0, 1.0), (0.0, 0.0), (1.0, 1.0), (1.0, 1.0))


def augment(
    image: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    settings: Augmentation,
    generator: torch.Generator,
):
    """Augment a batch; every sample gets its own random transform.

    Parameters
    ----------
    image : torch.Tensor of float32, shape (N, C, H, W)
    labels : torch.Tensor of int64, shape (N, H, W)
    weights : torch.Tensor of float32, shape (N, H, W)
    settings : Augmentation
    generator : torch.Generator
        On the CPU; draws the random parameters (reproducible for a seed).

    Returns
    -------
    image, labels, weights : torch.Tensor, shapes and dtypes as given
    """
    if settings.elastic_sigma > 0:
        grid = elastic_grid(image.shape, settings, generator).to(image.device)
        image, labels, weights = warp(image, labels, weights, grid)
    if settings.flips_rotations:
        image, labels, weights = _flip_rotate(image, labels, weights, generator)
    return _intensity(image, settings, generator), labels, weights


def elastic_grid(shape, settings: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Sampling grid for ``grid_sample``: identity plus displacements drawn on a coarse grid and
    interpolated bicubically (smooth) to full resolution.

    Returns
    -------
    torch.Tensor, shape (N, H, W, 2), normalised coordinates (x, y) in [-1, 1]
    """
    n, _, height, width = shape
    coarse = torch.randn(n, 2, settings.elastic_grid, settings.elastic_grid, generator=generator)
    displacement = F.interpolate(
        coarse * settings.elastic_sigma, size=(height, width), mode="bicubic", align_corners=True
    )
    # Pixels to normalised units (align_corners=True: -1 and 1 are the outer pixel centres).
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)]).view(1, 2, 1, 1)
    ys = torch.linspace(-1, 1, height).view(1, height, 1).expand(n, height, width)
    xs = torch.linspace(-1, 1, width).view(1, 1, width).expand(n, height, width)
    identity = torch.stack([xs, ys], dim=-1)
    return identity + (displacement * scale).permute(0, 2, 3, 1)


def warp(image, labels, weights, grid):
    """Resample image (bilinear), labels and weights (nearest) at ``grid``; outside the patch
    the content is mirrored."""
    options = {"padding_mode": "reflection", "align_corners": True}
    image = F.grid_sample(image, grid, mode="bilinear", **options)
    stacked = torch.stack([labels.to(grid.dtype), weights.to(grid.dtype)], dim=1)
    stacked = F.grid_sample(stacked, grid, mode="nearest", **options)
    return image, stacked[:, 0].round().to(labels.dtype), stacked[:, 1].to(weights.dtype)


def _flip_rotate(image, labels, weights, generator):
    out = ([], [], [])
    for i in range(image.shape[0]):
        turns = int(torch.randint(0, 4, (1,), generator=generator))
        if image.shape[-2] != image.shape[-1]:
            turns = 2 * (turns % 2)  # quarter turns would change a non-square patch's shape
        flip = bool(torch.randint(0, 2, (1,), generator=generator))
        for target, tensor in zip(out, (image[i], labels[i], weights[i])):
            tensor = torch.rot90(tensor, turns, dims=(-2, -1))
            target.append(torch.flip(tensor, dims=(-1,)) if flip else tensor)
    return tuple(torch.stack(items) for items in out)


def _intensity(image, settings, generator):
    n = image.shape[0]

    def draw(bounds):
        low, high = bounds
        values = low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator)
        return values.to(image.device)

    image = image * draw(settings.scale) + draw(settings.shift)
    gamma = draw(settings.gamma)
    return torch.sign(image) * image.abs().pow(gamma)
