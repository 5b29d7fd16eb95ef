"""The architecture record of a U-Net and its tile geometry, without torch.

Reading a model file's header, planning tiles and describing a model (``tiled-unet info``, the
Segment widget) need only this module, so they never import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PADDINGS = ("valid", "same")
# Output modes and their output channels (see core.targets).
MODE_CHANNELS = {"paper": 2, "boundary": 3, "distance": 3}


def n_classes_of(mode: str) -> int:
    """The number of outputs of a model of output ``mode``."""
    if mode not in MODE_CHANNELS:
        raise ValueError(f"mode: expected one of {sorted(MODE_CHANNELS)}, got {mode!r}")
    return MODE_CHANNELS[mode]


def output_mode(n_classes: int) -> str:
    """The output mode of a model without a recorded mode: by its outputs, "paper" (2) or
    "boundary" (3), as files written before the distance mode existed.

    Raises
    ------
    ValueError
        For any other class count.
    """
    if n_classes not in (2, 3):
        raise ValueError(f"n_classes: expected 2 (paper) or 3 (boundary), got {n_classes!r}")
    return "paper" if n_classes == 2 else "boundary"


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
    mode : {None, "paper", "boundary", "distance"}
        What the outputs mean (:mod:`.targets`); None: by ``n_classes`` (2 paper, 3 boundary),
        as in files written before the distance mode existed.
    """

    depth: int = 4
    base_channels: int = 64
    in_channels: int = 1
    n_classes: int = 2
    padding: str = "valid"
    norm: str | None = None
    mode: str | None = None

    def __post_init__(self):
        _check_int("depth", self.depth, 1, 8)
        _check_int("base_channels", self.base_channels, 1, 4096)
        _check_int("in_channels", self.in_channels, 1, 4096)
        _check_int("n_classes", self.n_classes, 1, 4096)
        if self.padding not in PADDINGS:
            raise ValueError(f"padding: expected one of {PADDINGS}, got {self.padding!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {self.norm!r}")
        if self.mode is not None and MODE_CHANNELS.get(self.mode) != self.n_classes:
            raise ValueError(
                f"mode: expected one of {sorted(MODE_CHANNELS)} with its outputs "
                f"({MODE_CHANNELS}), got {self.mode!r} with n_classes={self.n_classes}"
            )

    @property
    def output_mode(self) -> str:
        """ "paper", "boundary" or "distance" (:mod:`.targets`)."""
        return self.mode if self.mode is not None else output_mode(self.n_classes)

    def with_mode(self, mode: str) -> UNetConfig:
        """This architecture with the outputs of output ``mode`` (:mod:`.targets`).

        Raises
        ------
        ValueError
            For a mode other than "paper", "boundary" or "distance".
        """
        n_classes = n_classes_of(mode)
        # files keep mode None for the modes that n_classes names, readable by older versions
        named = "distance" if mode == "distance" else None
        return dataclasses.replace(self, n_classes=n_classes, mode=named)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if values["mode"] is None:  # files stay readable by versions without the field
            del values["mode"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"UNetConfig: unknown fields {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**values)


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")


class Geometry:
    """Sizes of a U-Net's tiles, from its config alone (no weights, no torch).

    The tiler asks these questions (:func:`~.tiling.plan_axis`); :class:`~.model.UNet` answers
    them through this class.
    """

    config: UNetConfig

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


class ConfigGeometry(Geometry):
    """The :class:`Geometry` of a config, for code that has no network (headers, planning)."""

    def __init__(self, config: UNetConfig):
        self.config = config
