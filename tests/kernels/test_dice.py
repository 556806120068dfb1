"""kernels.dice: Keras' dice and the soft Dice of integer masks against their loops, Keras'
documented values, closed-form gradients against central differences (float64)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kernels import dice as D
from kernels.backend import to_device, to_numpy

from helpers import check_kernel_gradient, one_hot_np

LEADING = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
CLASSES = st.integers(2, 4)


@pytest.mark.parametrize("axis", [None, 1, (1, 2, 3), -1, (0, 2)])
def test_dice_matches_reference(device, rng, axis):
    t = (rng.uniform(size=(2, 3, 3, 2)) > 0.5).astype(float)
    y = rng.uniform(size=(2, 3, 3, 2))
    values, _ = D.dice_forward(to_device(t, device), to_device(y, device), axis=axis)
    np.testing.assert_allclose(to_numpy(values), D.dice_reference(t, y, axis=axis), rtol=1e-10)


def test_dice_keras_docstring_values(device):
    t = np.array([[[[1.0], [1.0]], [[0.0], [0.0]]], [[[1.0], [1.0]], [[0.0], [0.0]]]], np.float32)
    y = np.array([[[[0.0], [1.0]], [[0.0], [1.0]]], [[[0.4], [0.0]], [[0.0], [0.9]]]], np.float32)
    per_image, _ = D.dice_forward(to_device(t, device), to_device(y, device), axis=(1, 2, 3))
    np.testing.assert_allclose(to_numpy(per_image), [0.5, 0.75757575], rtol=1e-6)
    whole, _ = D.dice_forward(to_device(t, device), to_device(y, device))
    assert whole.shape == () and float(whole) == pytest.approx(0.6164384, rel=1e-6)


@pytest.mark.parametrize("from_logits", [False, True])
def test_soft_dice_matches_reference(device, rng, from_logits):
    labels = rng.integers(0, 3, (2, 3, 3))
    valid = rng.uniform(size=(2, 3, 3)) > 0.25
    y = rng.standard_normal((2, 3, 3, 3)) if from_logits else rng.uniform(0.01, 1, (2, 3, 3, 3))
    loss, _ = D.soft_dice_forward(to_device(labels, device), to_device(y, device),
                                  to_device(valid, device), from_logits=from_logits, smooth=0.5)
    assert float(to_numpy(loss)) == pytest.approx(
        D.soft_dice_reference(labels, y, valid, from_logits=from_logits, smooth=0.5), rel=1e-10)


def test_soft_dice_of_a_perfect_prediction_is_zero():
    labels = np.array([[0, 1], [2, 1]])
    loss, _ = D.soft_dice_forward(labels, one_hot_np(labels, 3), from_logits=False, smooth=0.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)



@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=4).map(tuple),
       data=st.data(), seed=st.integers(0, 2**16))
def test_gradient_dice(shape, data, seed):
    rng = np.random.default_rng(seed)
    axes = data.draw(st.sets(st.integers(0, len(shape) - 1)))
    axis = data.draw(st.sampled_from([None, tuple(sorted(axes)) or None]))
    t = (rng.uniform(size=shape) > 0.5).astype(float)
    check_kernel_gradient(lambda y: D.dice_forward(t, y, axis=axis), D.dice_backward,
                          rng.uniform(0, 1, shape), seed)


@given(leading=LEADING, classes=CLASSES, from_logits=st.booleans(), masked=st.booleans(),
       smooth=st.sampled_from([0.0, 1e-5, 1.0]), seed=st.integers(0, 2**16))
def test_gradient_soft_dice(leading, classes, from_logits, masked, smooth, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=leading)
    valid = rng.uniform(size=leading) > 0.3 if masked else None
    valid = None if valid is not None and not valid.any() else valid
    x = rng.standard_normal(leading + (classes,)) if from_logits else \
        rng.uniform(0.05, 1.0, leading + (classes,))
    check_kernel_gradient(lambda y: D.soft_dice_forward(labels, y, valid, from_logits=from_logits,
                                                        smooth=smooth + 0.1),
                          D.soft_dice_backward, x, seed)
