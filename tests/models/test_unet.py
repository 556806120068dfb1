"""U-Net: sizes (the paper's 572 -> 388), parameter count, copy-and-crop, overfitting one image."""
import numpy as np
import pytest

import minicnn as mc
from minicnn.models import UNet
from minicnn.models.unet import predict_image


def test_parameter_count_matches_the_pytorch_twin():
    # Conv2d/BatchNorm2d/ConvTranspose2d with bias, counted by hand per level:
    # block(cin, c): two convs with bias and two BN layers of 4 * c (gamma, beta, moving stats)
    def block(cin, c):
        return 9 * cin * c + c + 9 * c * c + c + 2 * 4 * c
    widths = [16, 32, 64, 128, 256]
    total = block(3, 16) + block(16, 32) + block(32, 64) + block(64, 128) + block(128, 256)
    for level in reversed(range(4)):
        c = widths[level]
        total += 4 * (2 * c) * c + c          # Conv2DTranspose(c, 2, strides=2) from 2c channels
        total += block(2 * c, c)
    total += 16 * 3 + 3                        # 1x1 head
    moving = 4 * (2 * sum(widths[:4]) + widths[4])   # two BN per block, two moving stats each
    model = UNet(num_classes=3)
    model.build((None, 64, 64, 3))
    assert model.count_params() == total
    trainable = sum(w.size for w in model.trainable_weights)
    assert trainable == total - moving == 1_944_083


def test_valid_unet_follows_the_paper():
    model = UNet(num_classes=2, base_filters=2, depth=4, padding="valid")
    assert model.output_size(572) == 388
    assert model.input_size_for(388) == 572
    assert model.compute_output_shape((None, 572, 572, 1)) == (None, 388, 388, 2)


def test_valid_unet_runs_and_crops(rng):
    model = UNet(num_classes=2, base_filters=2, depth=2, padding="valid")
    size = model.input_size_for(12)
    out = model(rng.random((1, size, size, 1)).astype(np.float32))
    assert out.shape == (1, model.output_size(size), model.output_size(size), 2)


def test_size_that_does_not_fit_names_nearest_sizes(rng):
    model = UNet(num_classes=2, base_filters=2, depth=3)
    with pytest.raises(ValueError, match=r"input size 60 does not fit.*\[48, 56, 64, 72\]"):
        model(rng.random((1, 60, 64, 1)).astype(np.float32))


def test_predict_image_handles_any_size(rng):
    for padding in ("same", "valid"):
        model = UNet(num_classes=3, base_filters=2, depth=2, padding=padding)
        scores = predict_image(model, rng.random((37, 50, 1)), tile=16)
        assert scores.shape == (37, 50, 3)


def test_tiny_unet_overfits_one_image(rng):
    mc.seed(0)
    image = rng.random((1, 32, 32, 1)).astype(np.float32)
    mask = (image[..., 0] > 0.5).astype(np.int64)
    model = UNet(num_classes=2, base_filters=4, depth=2)
    model.compile(mc.optimizers.Adam(1e-2),
                  mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(image, mask, batch_size=1, epochs=60, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] / 10
