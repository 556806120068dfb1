"""kernels.losses: the kernels against their loop twins, closed-form gradients against central
differences (float64), extreme inputs and dtypes (the Dice losses and the reduction included)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kernels import dice as D
from kernels import losses as K
from kernels import reduction as R
from kernels.backend import to_device, to_numpy

from helpers import check_kernel_gradient, one_hot_np

LEADING = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
CLASSES = st.integers(2, 4)




def probabilities(rng, shape, low=0.05):
    return rng.uniform(low, 1.0, size=shape)


def labels_for(rng, shape, n_classes):
    return rng.integers(0, n_classes, size=shape)


# ------------------------------------------------------------------------------ fast vs reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_squared_error_matches_reference(device, rng, dtype):
    t, y = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    values, _ = K.mean_squared_error_forward(to_device(t.astype(dtype), device),
                                             to_device(y.astype(dtype), device))
    assert values.dtype == dtype
    np.testing.assert_allclose(to_numpy(values), K.mean_squared_error_reference(t, y),
                               rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("from_logits", [False, True])
def test_binary_crossentropy_matches_reference(device, rng, from_logits):
    t = rng.uniform(0, 1, (3, 5))
    y = rng.standard_normal((3, 5)) * 4 if from_logits else rng.uniform(0, 1, (3, 5))
    y[0, 0] = 0.0 if not from_logits else y[0, 0]            # a clipped probability
    loss, _ = K.binary_crossentropy_forward(to_device(t, device), to_device(y, device),
                                            from_logits=from_logits)
    np.testing.assert_allclose(to_numpy(loss),
                               K.binary_crossentropy_reference(t, y, from_logits=from_logits),
                               rtol=1e-10)


@pytest.mark.parametrize("from_logits", [False, True])
def test_categorical_crossentropy_matches_reference(device, rng, from_logits):
    t = rng.dirichlet(np.ones(4), size=(2, 3))
    y = rng.standard_normal((2, 3, 4)) * 3 if from_logits else rng.uniform(0, 2, (2, 3, 4))
    values, _ = K.categorical_crossentropy_forward(to_device(t, device), to_device(y, device),
                                                   from_logits=from_logits)
    np.testing.assert_allclose(to_numpy(values),
                               K.categorical_crossentropy_reference(t, y, from_logits=from_logits),
                               rtol=1e-10)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_categorical_crossentropy_matches_reference(device, rng, from_logits, weighted):
    labels = rng.integers(0, 3, (2, 4))
    valid = rng.uniform(size=(2, 4)) > 0.3
    y = rng.standard_normal((2, 4, 3)) if from_logits else rng.uniform(0.01, 1, (2, 4, 3))
    cw = np.array([0.5, 2.0, 1.5]) if weighted else None
    values, _ = K.sparse_categorical_crossentropy_forward(
        to_device(labels, device), to_device(y, device),
        None if cw is None else to_device(cw, device), to_device(valid, device),
        from_logits=from_logits)
    expected = K.sparse_categorical_crossentropy_reference(labels, y, cw, valid,
                                                           from_logits=from_logits)
    np.testing.assert_allclose(to_numpy(values), expected, rtol=1e-10)


def test_course_example_gives_keras_value(device):
    """The course's 2x2 image, 3 classes: Keras renormalises the row summing to 0.91."""
    y = np.array([[0.05, 0.95, 0], [0.1, .01, 0.8], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]).reshape(2, 2, 3)
    values, _ = K.sparse_categorical_crossentropy_forward(
        to_device(np.array([[1, 2], [0, 2]]), device), to_device(y, device), from_logits=False)
    assert float(to_numpy(values).mean()) == pytest.approx(0.26191, abs=5e-6)
    by_hand = -np.mean(np.log([0.95, 0.8 / 0.91, 0.7, 0.6]))
    assert float(to_numpy(values).mean()) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("balanced", [False, True])
def test_binary_focal_matches_reference(device, rng, from_logits, balanced):
    t = (rng.uniform(size=(3, 4)) > 0.5).astype(float)
    y = rng.standard_normal((3, 4)) * 3 if from_logits else rng.uniform(0, 1, (3, 4))
    focal = dict(from_logits=from_logits, gamma=2.5, alpha=0.3, apply_class_balancing=balanced)
    loss, _ = K.binary_focal_crossentropy_forward(to_device(t, device), to_device(y, device),
                                                  **focal)
    expected = K.binary_focal_crossentropy_reference(t, y, **focal)
    np.testing.assert_allclose(to_numpy(loss), expected, rtol=1e-10)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("alpha", [0.25, (0.2, 0.5, 0.3)])
def test_categorical_focal_matches_reference(device, rng, from_logits, alpha):
    t = one_hot_np(rng.integers(0, 3, (2, 3)), 3)
    y = rng.standard_normal((2, 3, 3)) * 2 if from_logits else rng.uniform(0.01, 1, (2, 3, 3))
    a = alpha if np.isscalar(alpha) else to_device(np.array(alpha), device)
    values, _ = K.categorical_focal_crossentropy_forward(to_device(t, device), to_device(y, device),
                                                         from_logits=from_logits, gamma=2.0,
                                                         alpha=a)
    expected = K.categorical_focal_crossentropy_reference(t, y, from_logits=from_logits,
                                                          gamma=2.0, alpha=alpha)
    np.testing.assert_allclose(to_numpy(values), expected, rtol=1e-10)


# ------------------------------------------------------------------------------ gradients (float64)
@given(leading=LEADING, classes=CLASSES, seed=st.integers(0, 2**16))
def test_gradient_mean_squared_error(leading, classes, seed):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(leading + (classes,))
    check_kernel_gradient(lambda y: K.mean_squared_error_forward(t, y),
                          K.mean_squared_error_backward, rng.standard_normal(leading + (classes,)))


@given(leading=LEADING, from_logits=st.booleans(), weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_gradient_binary_crossentropy(leading, from_logits, weighted, seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, leading)
    w = rng.uniform(0.5, 2, leading) if weighted else None
    x = rng.standard_normal(leading) * 3 if from_logits else probabilities(rng, leading)
    x = np.minimum(x, 0.95) if not from_logits else x
    check_kernel_gradient(lambda y: K.binary_crossentropy_forward(t, y, w, from_logits=from_logits),
                          K.binary_crossentropy_backward, x, seed)


@given(leading=LEADING, classes=CLASSES, from_logits=st.booleans(), weighted=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gradient_categorical_crossentropy(leading, classes, from_logits, weighted, seed):
    rng = np.random.default_rng(seed)
    t = rng.dirichlet(np.ones(classes), size=leading)             # soft labels
    cw = rng.uniform(0.5, 2, classes) if weighted else None
    x = rng.standard_normal(leading + (classes,)) * 2 if from_logits else \
        probabilities(rng, leading + (classes,))
    check_kernel_gradient(lambda y: K.categorical_crossentropy_forward(t, y, cw,
                                                                       from_logits=from_logits),
                          K.categorical_crossentropy_backward, x, seed)


@given(leading=LEADING, classes=CLASSES, from_logits=st.booleans(), weighted=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_gradient_sparse_categorical_crossentropy(leading, classes, from_logits, weighted, masked,
                                                  seed):
    rng = np.random.default_rng(seed)
    labels = labels_for(rng, leading, classes)
    cw = rng.uniform(0.5, 2, classes) if weighted else None
    valid = rng.uniform(size=leading) > 0.3 if masked else None
    x = rng.standard_normal(leading + (classes,)) * 2 if from_logits else \
        probabilities(rng, leading + (classes,))
    check_kernel_gradient(
        lambda y: K.sparse_categorical_crossentropy_forward(labels, y, cw, valid,
                                                            from_logits=from_logits),
        K.sparse_categorical_crossentropy_backward, x, seed)


@given(leading=LEADING, from_logits=st.booleans(), balanced=st.booleans(),
       gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), smooth=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gradient_binary_focal(leading, from_logits, balanced, gamma, smooth, seed):
    rng = np.random.default_rng(seed)
    t = (rng.uniform(size=leading) > 0.5).astype(float)
    t = t * 0.8 + 0.1 if smooth else t
    x = rng.standard_normal(leading) * 3 if from_logits else \
        rng.uniform(0.05, 0.95, leading)
    check_kernel_gradient(
        lambda y: K.binary_focal_crossentropy_forward(t, y, from_logits=from_logits, gamma=gamma,
                                                      alpha=0.3, apply_class_balancing=balanced),
        K.binary_focal_crossentropy_backward, x, seed)


@given(leading=LEADING, classes=CLASSES, from_logits=st.booleans(),
       gamma=st.sampled_from([0.0, 0.5, 2.0]), vector_alpha=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gradient_categorical_focal(leading, classes, from_logits, gamma, vector_alpha, seed):
    rng = np.random.default_rng(seed)
    t = rng.dirichlet(np.ones(classes), size=leading)
    alpha = rng.uniform(0.1, 1, classes) if vector_alpha else 0.25
    x = rng.standard_normal(leading + (classes,)) * 2 if from_logits else \
        probabilities(rng, leading + (classes,))
    check_kernel_gradient(
        lambda y: K.categorical_focal_crossentropy_forward(t, y, from_logits=from_logits,
                                                           gamma=gamma, alpha=alpha),
        K.categorical_focal_crossentropy_backward, x, seed)


def test_gradient_of_clipped_probabilities_is_zero():
    """A probability outside [eps, 1 - eps] is clipped: no gradient flows through the clip."""
    t = np.array([1.0, 0.0])
    _, saved = K.binary_crossentropy_forward(t, np.array([0.0, 1.0]), from_logits=False)
    np.testing.assert_array_equal(K.binary_crossentropy_backward(np.ones(2), saved), [0.0, 0.0])


# ------------------------------------------------------------------------------ extremes and dtypes
EXTREME_LOGITS = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [1e4, 1e4, -1e4]])


@pytest.mark.parametrize("case", ["bce", "cce", "scce", "bfocal", "cfocal", "softdice"])
@pytest.mark.parametrize("from_logits", [True, False])
def test_extreme_inputs_give_finite_losses_and_gradients(device, case, from_logits):
    if from_logits:
        y = EXTREME_LOGITS
    else:                                           # probabilities of exactly 0 and 1
        y = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([1, 0, 2])
    t = one_hot_np(labels, 3)
    y, t_dev, labels_dev = (to_device(a, device) for a in (y, t, labels))
    forward, backward = {
        "bce": (lambda: K.binary_crossentropy_forward(t_dev, y, from_logits=from_logits),
                K.binary_crossentropy_backward),
        "cce": (lambda: K.categorical_crossentropy_forward(t_dev, y, from_logits=from_logits),
                K.categorical_crossentropy_backward),
        "scce": (lambda: K.sparse_categorical_crossentropy_forward(labels_dev, y,
                                                                   from_logits=from_logits),
                 K.sparse_categorical_crossentropy_backward),
        "bfocal": (lambda: K.binary_focal_crossentropy_forward(
            t_dev, y, from_logits=from_logits, gamma=2.0, alpha=0.25, apply_class_balancing=True),
                   K.binary_focal_crossentropy_backward),
        "cfocal": (lambda: K.categorical_focal_crossentropy_forward(
            t_dev, y, from_logits=from_logits, gamma=2.0, alpha=0.25),
                   K.categorical_focal_crossentropy_backward),
        "softdice": (lambda: D.soft_dice_forward(labels_dev, y, from_logits=from_logits),
                     D.soft_dice_backward),
    }[case]
    values, saved = forward()
    grad = backward(values * 0 + 1, saved)
    assert np.all(np.isfinite(to_numpy(values))) and np.all(np.isfinite(to_numpy(grad)))


def test_wrong_logits_of_1e4_cost_what_they_should():
    """Softplus form: a logit of 1e4 on the wrong side costs 1e4, not -log(1e-7)."""
    loss, _ = K.binary_crossentropy_forward(np.array([0.0]), np.array([1e4]), from_logits=True)
    assert float(loss[0]) == pytest.approx(1e4)
    values, _ = K.sparse_categorical_crossentropy_forward(np.array([1]), np.array([[1e4, -1e4]]),
                                                          from_logits=True)
    assert float(values[0]) == pytest.approx(2e4)


@pytest.mark.parametrize("case", ["mse", "bce", "cce", "scce", "bfocal", "cfocal", "dice", "softdice"])
def test_float32_stays_float32(device, rng, case):
    y = to_device(rng.uniform(0.1, 1, (2, 3, 3)).astype(np.float32), device)
    t = to_device(one_hot_np(rng.integers(0, 3, (2, 3)), 3).astype(np.float32), device)
    labels = to_device(rng.integers(0, 3, (2, 3)), device)
    alpha = to_device(np.array([0.2, 0.3, 0.5], np.float32), device)
    forward, backward = {
        "mse": (lambda: K.mean_squared_error_forward(t, y), K.mean_squared_error_backward),
        "bce": (lambda: K.binary_crossentropy_forward(t, y, from_logits=True),
                K.binary_crossentropy_backward),
        "cce": (lambda: K.categorical_crossentropy_forward(t, y, from_logits=False),
                K.categorical_crossentropy_backward),
        "scce": (lambda: K.sparse_categorical_crossentropy_forward(labels, y, from_logits=True),
                 K.sparse_categorical_crossentropy_backward),
        "bfocal": (lambda: K.binary_focal_crossentropy_forward(
            t, y, from_logits=False, gamma=2.0, alpha=0.25, apply_class_balancing=True),
                   K.binary_focal_crossentropy_backward),
        "cfocal": (lambda: K.categorical_focal_crossentropy_forward(t, y, from_logits=True,
                                                                    gamma=2.0, alpha=alpha),
                   K.categorical_focal_crossentropy_backward),
        "dice": (lambda: D.dice_forward(t, y, axis=(1, 2)), D.dice_backward),
        "softdice": (lambda: D.soft_dice_forward(labels, y, from_logits=True), D.soft_dice_backward),
    }[case]
    values, saved = forward()
    grad = backward(values * 0 + 1, saved)
    assert values.dtype == np.float32 and grad.dtype == np.float32
    out, rsaved = R.weighted_reduction_forward(values, reduction="sum_over_batch_size")
    assert out.dtype == np.float32
    assert R.weighted_reduction_backward(out * 0 + 1, rsaved).dtype == np.float32
