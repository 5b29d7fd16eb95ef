import pytest
import torch

from napari_tiled_unet.core.model import UNet, UNetConfig

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
