import numpy as np
import pytest
import torch

from napari_tiled_unet.core.model import UNet, UNetConfig
from napari_tiled_unet.core.tiling import mirror_pad


def make_model(depth=2, base_channels=2, in_channels=1, seed=0, **config):
    torch.manual_seed(seed)
    model = UNet(
        UNetConfig(depth=depth, base_channels=base_channels, in_channels=in_channels, **config)
    )
    return model.eval()


def whole_image_reference(model, plane: np.ndarray) -> np.ndarray:
    """Foreground probability from ONE forward pass over the whole mirror-padded plane (C, Y, X)."""
    height, width = plane.shape[-2:]
    context = model.context
    rows, cols = model.legal_input_size(height), model.legal_input_size(width)
    padded = mirror_pad(
        plane, (context, context), (rows - height - context, cols - width - context)
    )
    with torch.no_grad():
        logits = model(torch.from_numpy(padded.astype(np.float32))[None])
    return torch.softmax(logits, dim=1)[0, 1, :height, :width].numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
