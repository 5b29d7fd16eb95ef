from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_tiled_unet.core.model import UNet, UNetConfig
from napari_tiled_unet.core.normalize import Normalization

from ..conftest import make_model


@pytest.mark.parametrize("depth, margin", [(1, 16), (2, 40), (3, 88), (4, 184)])
def test_margin_matches_forward_pass(depth, margin):
    model = make_model(depth=depth)
    size = model.legal_input_size(30)
    out = model(torch.zeros(1, 1, size, size))
    assert model.margin == margin
    assert out.shape == (1, 2, size - margin, size - margin)


def test_paper_network_maps_572_to_388():
    model = UNet()
    assert model.output_size(572) == 388
    assert model.output_size(571) is None  # an odd size before a pooling
    assert (
        sum(p.numel() for p in model.parameters()) == 31_030_658
    )  # counted by hand from the paper's layer list


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_legal_sizes_are_exactly_those_the_network_accepts(depth):
    model = make_model(depth=depth)
    for size in range(1, 3 * model.margin):
        expected = model.output_size(size)
        if expected is None:
            continue
        assert (
            model(torch.zeros(1, 1, size, 4 * model.size_step + model.margin)).shape[-2] == expected
        )
    assert model.output_size(model.legal_input_size(1)) >= 1
    assert model.output_size(model.legal_input_size(1) - model.size_step) is None


def test_same_padding_keeps_any_size():
    model = make_model(depth=3, padding="same", norm="batch")
    assert model(torch.zeros(2, 1, 37, 50)).shape == (2, 2, 37, 50)
    assert model.margin == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("depth", 0),
        ("base_channels", 1.5),
        ("padding", "full"),
        ("norm", "layer"),
        ("n_classes", True),
    ],
)
def test_bad_config_is_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        UNetConfig(**{field: value})


def test_a_config_takes_each_output_mode_and_keeps_its_network():
    network = UNetConfig(depth=3, base_channels=16, in_channels=2, norm="batch")
    for mode, n_classes, recorded in [
        ("paper", 2, None),
        ("boundary", 3, None),  # files name it by its outputs, as before the distance mode
        ("distance", 3, "distance"),
    ]:
        config = network.with_mode(mode)
        assert config == replace(network, n_classes=n_classes, mode=recorded)
        assert config.output_mode == mode
        assert config.with_mode("paper") == network
    with pytest.raises(ValueError, match=r"mode: expected one of .*, got 'watershed'"):
        network.with_mode("watershed")


def test_a_model_gets_another_output_mode_with_its_network_and_shared_outputs_kept():
    from napari_tiled_unet.core.model import with_output_mode

    paper = make_model(depth=2, base_channels=4, norm="batch", seed=3)
    paper.normalization = Normalization("percentile", 1.0, 99.8)
    paper.metadata = {"diameter": 20.0, "postprocess": {"threshold": 0.7, "min_size": 25}}
    distance = with_output_mode(paper, "distance").eval()
    assert distance.config == replace(paper.config, n_classes=3, mode="distance")
    assert distance.normalization == paper.normalization
    assert distance.metadata == {"diameter": 20.0}  # the threshold was for another decoder
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, 92, 92), dtype=np.float32))
    with torch.no_grad():
        before, after = paper(x), distance(x)
    assert torch.equal(after[:, :2], before)  # background / foreground: the same logits
    assert not after[:, 2].any()  # a new output starts at 0
    boundary = with_output_mode(distance, "boundary").eval()
    assert boundary.config == replace(paper.config, n_classes=3, mode=None)
    assert boundary.config.output_mode == "boundary"
    with torch.no_grad():
        rim = boundary(x)
    assert torch.equal(rim[:, :2], before) and not rim[:, 2].any()  # a boundary starts at 0
    back = with_output_mode(boundary, "paper").eval()
    with torch.no_grad():
        assert torch.equal(back(x), before)
    assert with_output_mode(paper, "paper") is paper
    with pytest.raises(ValueError, match=r"mode: expected one of .*, got 'watershed'"):
        with_output_mode(paper, "watershed")
