"""The engine on CUDA: exact in fp32, close in autocast, the same labels through segment().

Skipped on machines without CUDA (CI has none); run them where a GPU is at hand.
"""

import numpy as np
import pytest
import torch

from napari_tiled_unet.core.predict import predict_array
from napari_tiled_unet.core.segment import segment

from ..conftest import make_model, whole_image_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (300, 7), (517, 1025)])
def test_fp32_tiles_on_cuda_match_the_whole_image_on_the_cpu(dtype, shape, rng):
    model = make_model(depth=3, base_channels=4, seed=2)
    image = (rng.random(shape) * 200).astype(dtype)
    reference = whole_image_reference(model, image[None].astype(np.float32))
    for tile in (model.legal_input_size(model.size_step) + 3 * model.size_step, 2048):
        result = predict_array(model, image, tile=tile, batch=3, device="cuda", precision="fp32")
        assert np.abs(result - reference).max() <= 1e-5


def test_autocast_and_compile_stay_close_and_segment_agrees(rng):
    model = make_model(depth=3, base_channels=8, seed=4)
    image = rng.random((3, 700, 900), dtype=np.float32)
    exact = predict_array(model, image, device="cpu")
    fast = predict_array(model, image, device="cuda", precision="bf16", compile=True)
    assert np.abs(fast - exact).max() <= 2e-2
    planes = [p for e in segment(model, image, device="cuda", precision="fp32") for p in e.planes]
    assert [p.index for p in planes] == [0, 1, 2]
    for plane in planes:
        assert np.abs(plane.probability - exact[plane.index]).max() <= 1e-5
