"""BatchAugmentation: each random step does what it says, and image and label move together."""

import torch

from utils.data.augmentation import BatchAugmentation


def quiet(**changes) -> BatchAugmentation:
    """An augmentation that does nothing except what `changes` switch on."""
    return BatchAugmentation(**{"flip_probability": 0, "affine_probability": 0, "brightness_probability": 0,
                                "noise_probability": 0, **changes})


def blob_batch(n=4, shape=(12, 16, 12)):
    labels = torch.zeros(n, 1, *shape, dtype=torch.uint8)
    labels[:, :, 3:7, 4:9, 3:6] = 1
    labels[:, :, 7:9, 4:9, 3:6] = 2
    return labels.float() * 10 + 1, labels


def test_augmentation_switched_off_is_the_identity():
    images, labels = blob_batch()
    out_images, out_labels = quiet()(list(zip(images, labels)))
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


def test_flip_is_left_right_only():
    images, labels = blob_batch()
    out_images, out_labels = quiet(flip_probability=1)(list(zip(images, labels)))
    assert torch.equal(out_images, images.flip(2)) and torch.equal(out_labels, labels.flip(2))


def test_affine_without_rotation_or_scaling_is_the_identity():
    images, labels = blob_batch()
    out_images, out_labels = quiet(affine_probability=1, degrees=0, scaling=0).augment(images, labels)
    assert torch.allclose(out_images, images, atol=1e-4) and torch.equal(out_labels, labels)


def test_image_and_label_move_together():
    torch.manual_seed(0)
    images, labels = blob_batch(n=16)
    out_images, out_labels = BatchAugmentation(affine_probability=1, brightness_probability=0,
                                               noise_probability=0).augment(images, labels)
    assert out_images.shape == images.shape and out_labels.dtype == torch.uint8
    assert set(out_labels.unique().tolist()) <= {0, 1, 2}
    # The image encodes its label (1, 11, 21): after the same geometric transform they still agree
    # almost everywhere (bilinear and nearest interpolation differ only along edges).
    agreement = ((out_images - 1) / 10).round().clamp(0, 2).to(torch.uint8) == out_labels
    assert agreement.float().mean() > 0.95
    assert not torch.equal(out_labels, labels)
