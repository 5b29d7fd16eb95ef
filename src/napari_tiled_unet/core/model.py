"""The U-Net of Ronneberger et al. (2015) with valid (unpadded) or same-padded convolutions.

A valid-padding network maps an input tile of size ``s`` to an output of size ``s - margin``;
every 2x2 max pooling must see an even size, so only some input sizes are legal. The model
answers both questions (:meth:`UNet.output_size`, :meth:`UNet.legal_input_size`) so that the
tiler never hard-codes numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

PADDINGS = ("valid", "same")
NORMS = (None, "batch")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`.

    Parameters
    ----------
    depth : int
        Number of 2x2 max poolings (the paper uses 4).
    base_channels : int
        Feature channels of the first level; each level down doubles them (the paper uses 64).
    in_channels : int
        Channels of the input image.
    n_classes : int
        Output classes (logits); 2 for background / foreground.
    padding : {"valid", "same"}
        ``"valid"``: unpadded 3x3 convolutions as in the paper, output smaller than input.
        ``"same"``: zero-padded convolutions, output the size of the input.
    norm : {None, "batch"}
        Optional BatchNorm after each convolution.
    """

    depth: int = 4
    base_channels: int = 64
    in_channels: int = 1
    n_classes: int = 2
    padding: str = "valid"
    norm: str | None = None

    def __post_init__(self):
        _check_int("depth", self.depth, 1, 8)
        _check_int("base_channels", self.base_channels, 1, 4096)
        _check_int("in_channels", self.in_channels, 1, 4096)
        _check_int("n_classes", self.n_classes, 1, 4096)
        if self.padding not in PADDINGS:
            raise ValueError(f"padding: expected one of {PADDINGS}, got {self.padding!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {self.norm!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**values)


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, pad: int, norm: str | None):
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, kernel_size=3, padding=pad, bias=norm is None))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net: two 3x3 convolutions + ReLU per level, 2x2 max pooling, 2x2 up-convolution,
    crop-and-concatenate skip connections and a 1x1 convolution to class logits.

    Parameters
    ----------
    config : UNetConfig
        The architecture. ``UNet()`` is the paper's network (depth 4, 64 base channels).

    Notes
    -----
    ``forward`` maps ``(N, in_channels, H, W)`` to ``(N, n_classes, H - margin, W - margin)``
    for legal sizes of a valid model, and to ``(N, n_classes, H, W)`` for a same model (which
    accepts any size: it zero-pads to a multiple of ``2**depth`` internally).
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config
        pad = 1 if c.padding == "same" else 0
        widths = [c.base_channels * 2**level for level in range(c.depth + 1)]
        self.down = nn.ModuleList()
        cin = c.in_channels
        for width in widths[:-1]:
            self.down.append(_DoubleConv(cin, width, pad, c.norm))
            cin = width
        self.bottom = _DoubleConv(widths[-2], widths[-1], pad, c.norm)
        self.upconvs = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(c.depth)):
            self.upconvs.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
            self.up.append(_DoubleConv(2 * widths[level], widths[level], pad, c.norm))
        self.head = nn.Conv2d(widths[0], c.n_classes, kernel_size=1)

    @property
    def margin(self) -> int:
        """Input size minus output size: 184 for depth 4 (valid), 0 for same padding."""
        if self.config.padding == "same":
            return 0
        return 12 * 2**self.config.depth - 8

    @property
    def context(self) -> int:
        """Pixels of context the tiler adds on each side of an output tile.

        Half the margin for valid models. A same model has no margin, but its border pixels see
        zero padding; giving it the valid receptive field as context keeps stitching seams small.
        """
        return (12 * 2**self.config.depth - 8) // 2

    @property
    def size_step(self) -> int:
        """Legal input sizes of a valid model are spaced by ``2**depth``."""
        return 2**self.config.depth

    def output_size(self, size: int) -> int | None:
        """Output size for an input of ``size`` pixels along one axis, or None when illegal."""
        if self.config.padding == "same":
            return size if size >= 1 else None
        for _ in range(self.config.depth):
            size -= 4
            if size < 2 or size % 2:
                return None
            size //= 2
        size -= 4
        for _ in range(self.config.depth):
            if size < 1:
                return None
            size = 2 * size - 4
        return size if size >= 1 else None

    def legal_input_size(self, min_output: int) -> int:
        """Smallest legal input size whose output is at least ``min_output`` pixels."""
        if self.config.padding == "same":
            return max(1, min_output)
        size = max(1, min_output) + self.margin
        while self.output_size(size) is None:
            size += 1
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.padding == "same":
            return self._forward_same(x)
        return self._forward(x)

    def _forward_same(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        step = self.size_step
        pad_h, pad_w = -height % step, -width % step
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self._forward(x)[..., :height, :width]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for upconv, block, skip in zip(self.upconvs, self.up, reversed(skips)):
            x = upconv(x)
            x = block(torch.cat([_center_crop(skip, x.shape[-2:]), x], dim=1))
        return self.head(x)


def _center_crop(x: torch.Tensor, size) -> torch.Tensor:
    dy = (x.shape[-2] - size[0]) // 2
    dx = (x.shape[-1] - size[1]) // 2
    return x[..., dy : dy + size[0], dx : dx + size[1]]
