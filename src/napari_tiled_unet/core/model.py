"""The U-Net of Ronneberger et al. (2015) with valid (unpadded) or same-padded convolutions.

A valid-padding network maps an input tile of size ``s`` to an output of size ``s - margin``;
every 2x2 max pooling must see an even size, so only some input sizes are legal. The model
answers both questions (:meth:`UNet.output_size`, :meth:`UNet.legal_input_size`) so that the
tiler never hard-codes numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .config import NORMS, PADDINGS, Geometry, UNetConfig
from .normalize import Normalization

__all__ = ["NORMS", "PADDINGS", "UNet", "UNetConfig", "with_output_mode"]


@dataclass
class ModelRecord:
    """What a model declares beside its architecture (``UNet.config``) and weights; saved in
    model files and training checkpoints, and read by the engine.

    Attributes
    ----------
    normalization : Normalization
        How input planes are scaled; a new model scales nothing until it is given one (training
        sets it).
    metadata : dict
        JSON-serialisable facts: ``diameter`` (typical object diameter of the training data,
        px), ``postprocess`` (recommended :class:`~.postprocess.PostprocessOptions`), training
        iterations, validation scores.
    """

    normalization: Normalization = field(default_factory=lambda: Normalization("none"))
    metadata: dict = field(default_factory=dict)


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, pad: int, norm: str | None):
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, kernel_size=3, padding=pad, bias=norm is None))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(Geometry, nn.Module):
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
        self.record = ModelRecord()
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
    def normalization(self) -> Normalization:
        return self.record.normalization

    @normalization.setter
    def normalization(self, value: Normalization) -> None:
        self.record.normalization = value

    @property
    def metadata(self) -> dict:
        return self.record.metadata

    @metadata.setter
    def metadata(self, value: dict) -> None:
        self.record.metadata = dict(value)

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


def with_output_mode(model: UNet, mode: str) -> UNet:
    """``model`` with its output layer rebuilt for another output ``mode`` (:mod:`.targets`),
    to be fine-tuned: a distance or boundary model can start from a trained 2-class one.

    Every weight but the output layer's is copied. The first two outputs, background and
    foreground in every mode (interior in the boundary mode), keep theirs; the others start at
    zero. The parent's ``postprocess`` recommendation is dropped: it was tuned for another
    decoder. A distance output at zero finds nothing until it has learnt to pass its seed
    level (500-1000 iterations at 3e-4 on DSB), but learns the map best: started from the
    foreground logit instead, so that the model would first segment as its parent does, the
    same 3000 iterations ended at 0.73-0.76 pooled AP@0.5, against 0.82 from zero
    (benchmarks/RESULTS.md).

    Parameters
    ----------
    model : UNet
    mode : {"paper", "boundary", "distance"}

    Returns
    -------
    UNet
        A new model (``model`` itself when it already has that mode).
    """
    config = model.config.with_mode(mode)
    if model.config.output_mode == mode:
        return model
    new = UNet(config)
    weights = model.state_dict()
    kept = new.state_dict()
    for name, tensor in weights.items():
        if name.startswith("head."):
            kept[name].zero_()[:2] = tensor[:2]
        else:
            kept[name] = tensor
    new.load_state_dict(kept)
    new.normalization = model.normalization
    new.metadata = {k: v for k, v in model.metadata.items() if k != "postprocess"}
    return new
