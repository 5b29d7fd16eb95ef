"""Training defaults, in one place: the command line, the Train widget and ``TrainConfig``
read them from here.

Two kinds of run start differently:

- **from scratch** (a new network): the recipe that trained the bundled model, which a short
  CPU run can follow (a depth-3, 16-channel U-Net with batch normalisation, Adam at 1e-3 decaying
  to 0 on a cosine). The paper's plain network at Adam 1e-4 learned several times slower
  (issue 16: 25 EM slices, 2000 iterations, pixel error 0.199 against the paper's 0.061).
- **fine-tuning** (``--init``, "start from" a model): a tenth of that learning rate, constant,
  so the few annotations adjust the model rather than overwrite it, and an L2-SP pull of the
  weights toward the starting ones (Li et al., ICML 2018); validation is more frequent, and the
  starting model is scored first so a worse result is reported. Measured with
  bench_finetune.py (18 painted nuclei of one image): without the pull AP@0.5 on 25 similar
  images fell from 0.826 to 0.765; with ``anchor`` 10 it rose to 0.834 (1: 0.797).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import UNetConfig


@dataclass(frozen=True)
class TrainPreset:
    """Starting values of the training settings that depend on the kind of run.

    Attributes
    ----------
    iterations : int
    lr : float
        Adam's learning rate.
    lr_schedule : {"constant", "cosine"}
    validate_every : int
        Iterations between validations (each can write the best model so far).
    anchor : float
        Weight of the L2-SP term ``anchor * sum((w - w_start) ** 2)`` added to the loss of a
        fine-tuning run (0: none).
    """

    iterations: int
    lr: float
    lr_schedule: str
    validate_every: int
    anchor: float = 0.0


SCRATCH = TrainPreset(iterations=2000, lr=1e-3, lr_schedule="cosine", validate_every=100)
FINE_TUNE = TrainPreset(
    iterations=500, lr=1e-4, lr_schedule="constant", validate_every=50, anchor=10.0
)
PRESETS = {"scratch": SCRATCH, "fine-tune": FINE_TUNE}

# The architecture of a model trained from scratch (the bundled model's).
SCRATCH_ARCHITECTURE = UNetConfig(depth=3, base_channels=16, norm="batch")


def preset_for(fine_tuning: bool) -> TrainPreset:
    """The preset of a run that starts from a trained model (``fine_tuning``) or from scratch."""
    return FINE_TUNE if fine_tuning else SCRATCH
