import torch

from napari_tiled_unet.core.augment import NO_AUGMENTATION, Augmentation, augment


def coordinates(n=3, size=64):
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    code = (ys * size + xs).expand(n, size, size)  # every pixel's own id
    image = torch.stack([ys, xs]).float().expand(n, 2, size, size).contiguous()
    return image, code.clone(), code.float() + 0.5  # weights: same code, shifted


def test_one_field_warps_image_labels_and_weights_together():
    image, labels, weights = coordinates()
    settings = Augmentation(
        elastic_sigma=10.0, flips_rotations=True, scale=(1, 1), shift=(0, 0), gamma=(1, 1)
    )
    out_image, out_labels, out_weights = augment(
        image, labels, weights, settings, torch.Generator().manual_seed(0)
    )
    size = image.shape[-1]
    assert not torch.equal(out_labels, labels)  # something moved
    # Nearest sampling keeps ids: every output label is one of the input ids, and weights
    # follow the very same source pixel.
    assert torch.isin(out_labels, labels).all()
    assert torch.equal(out_weights, out_labels.float() + 0.5)
    # The bilinear image sampled the same place: its coordinates are within a pixel of the
    # nearest source pixel's coordinates (in the interior, away from mirrored borders).
    source_y, source_x = out_labels // size, out_labels % size
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert (out_image[:, 0][inner] - source_y[inner].float()).abs().max() <= 0.5 + 1e-4
    assert (out_image[:, 1][inner] - source_x[inner].float()).abs().max() <= 0.5 + 1e-4


def test_ignored_pixels_stay_exactly_ignored_and_classes_stay_classes():
    torch.manual_seed(0)
    image = torch.rand(4, 1, 48, 48)
    labels = (torch.rand(4, 48, 48) > 0.5).long()
    weights = torch.ones(4, 48, 48)
    weights[:, :, :20] = 0
    _, out_labels, out_weights = augment(
        image, labels, weights, Augmentation(), torch.Generator().manual_seed(1)
    )
    assert set(out_labels.unique().tolist()) <= {0, 1}
    assert set(out_weights.unique().tolist()) == {0.0, 1.0}


def test_no_augmentation_is_the_identity_and_seeds_repeat():
    image, labels, weights = coordinates()
    out = augment(image, labels, weights, NO_AUGMENTATION, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(out, (image, labels, weights)))
    first = augment(image, labels, weights, Augmentation(), torch.Generator().manual_seed(7))
    again = augment(image, labels, weights, Augmentation(), torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
