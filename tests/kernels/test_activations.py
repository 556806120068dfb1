"""kernels.activations (the plain kernels): against the loops, gradients against central
differences, stability at +-1e4, dropout statistics, bad inputs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import activations as A
from kernels.backend import to_device, to_numpy
from minicnn.gradcheck import numerical_gradient as numerical_grad

FIXTURE_OK = settings(suppress_health_check=list(settings.default.suppress_health_check)
                      + [HealthCheck.function_scoped_fixture])
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from([np.float32, np.float64])

# name -> (forward, backward, backward takes "y" or "x", reference forward, reference backward)
ELEMENTWISE = {
    "relu": (A.relu_forward, A.relu_backward, "y", A.relu_reference, A.relu_backward_reference),
    "leaky_relu": (lambda x: A.leaky_relu_forward(x, alpha=0.2),
                   lambda dy, x: A.leaky_relu_backward(dy, x, alpha=0.2), "x",
                   lambda x: A.leaky_relu_reference(x, alpha=0.2),
                   lambda dy, x: A.leaky_relu_backward_reference(dy, x, alpha=0.2)),
    "sigmoid": (A.sigmoid_forward, A.sigmoid_backward, "y", A.sigmoid_reference,
                A.sigmoid_backward_reference),
    "tanh": (A.tanh_forward, A.tanh_backward, "y", A.tanh_reference, A.tanh_backward_reference),
}
AXIS_WISE = {
    "softmax": (A.softmax_forward, A.softmax_backward, A.softmax_reference,
                A.softmax_backward_reference),
    "log_softmax": (A.log_softmax_forward, A.log_softmax_backward, A.log_softmax_reference,
                    A.log_softmax_backward_reference),
}


def away_from_kinks(rng, shape):
    """Normal values kept at least 1e-3 from 0, where relu and leaky_relu bend."""
    x = rng.standard_normal(shape) * 2
    return np.where(np.abs(x) < 1e-3, 0.5, x)


@FIXTURE_OK
@pytest.mark.parametrize("name", ELEMENTWISE)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16))
def test_elementwise_fast_equals_reference(device, name, shape, dtype, seed):
    forward, backward, saved, forward_ref, backward_ref = ELEMENTWISE[name]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x.flat[0] = 0.0                                            # the kink is included
    dy = rng.standard_normal(shape).astype(dtype)
    y = forward(to_device(x, device))
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(to_numpy(y), forward_ref(x), **TOL[dtype])
    keep = to_numpy(y) if saved == "y" else x
    dx = backward(to_device(dy, device), to_device(keep, device))
    assert dx.dtype == dtype
    np.testing.assert_allclose(to_numpy(dx), backward_ref(dy, keep), **TOL[dtype])


@pytest.mark.parametrize("name", ELEMENTWISE)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_elementwise_gradient(name, shape, seed):
    forward, backward, saved, _, _ = ELEMENTWISE[name]
    rng = np.random.default_rng(seed)
    x = away_from_kinks(rng, shape)
    projection = rng.standard_normal(shape)
    analytic = backward(projection, forward(x) if saved == "y" else x)
    np.testing.assert_allclose(analytic, numerical_grad(forward, x, projection), rtol=1e-6,
                               atol=1e-8)


@FIXTURE_OK
@pytest.mark.parametrize("name", AXIS_WISE)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16), data=st.data())
def test_axis_wise_fast_equals_reference(device, name, shape, dtype, seed, data):
    forward, backward, forward_ref, backward_ref = AXIS_WISE[name]
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = forward(to_device(x, device), axis=axis)
    assert y.dtype == dtype
    np.testing.assert_allclose(to_numpy(y), forward_ref(x, axis=axis), **TOL[dtype])
    dx = backward(to_device(dy, device), y, axis=axis)
    assert dx.dtype == dtype
    np.testing.assert_allclose(to_numpy(dx), backward_ref(dy, to_numpy(y), axis=axis),
                               **TOL[dtype])


@pytest.mark.parametrize("name", AXIS_WISE)
@given(shape=shapes, seed=st.integers(0, 2**16), data=st.data())
def test_axis_wise_gradient(name, shape, seed, data):
    forward, backward, _, _ = AXIS_WISE[name]
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2
    projection = rng.standard_normal(shape)
    analytic = backward(projection, forward(x, axis=axis), axis=axis)
    numeric = numerical_grad(lambda v: forward(v, axis=axis), x, projection)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_log_softmax_stable_at_1e4(dtype):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [5e3, 1e4, 1e4]], dtype=dtype)
    y = A.softmax_forward(x)
    np.testing.assert_allclose(y, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5]], atol=1e-7)
    z = A.log_softmax_forward(x)
    np.testing.assert_allclose(z, [[0, -2e4, -1e4], [-np.log(3)] * 3,
                                   [-5e3 - np.log(2), -np.log(2), -np.log(2)]], rtol=1e-6)
    assert np.all(np.isfinite(z)) and y.dtype == z.dtype == dtype
    np.testing.assert_allclose(A.softmax_forward(x, axis=0).sum(axis=0), 1, rtol=1e-6)
    s = A.sigmoid_forward(np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=dtype))
    assert np.all(np.isfinite(s)) and s.dtype == dtype
    np.testing.assert_allclose(s, [0, np.exp(-50.0), 0.5, 1, 1], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(A.tanh_forward(np.array([-1e4, 1e4], dtype=dtype)), [-1, 1])


def test_known_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    np.testing.assert_array_equal(A.relu_forward(x), [0, 0, 0, 0.5, 2])
    np.testing.assert_allclose(A.leaky_relu_forward(x), [-0.6, -0.15, 0, 0.5, 2])   # Keras 3: 0.3
    np.testing.assert_allclose(A.leaky_relu_backward(np.ones(5), x), [0.3, 0.3, 0.3, 1, 1])
    np.testing.assert_array_equal(A.relu_backward(np.ones(5), A.relu_forward(x)), [0, 0, 0, 1, 1])
    np.testing.assert_allclose(A.sigmoid_forward(x), 1 / (1 + np.exp(-x)), rtol=1e-15)
    np.testing.assert_allclose(A.softmax_forward(np.log([[1.0, 2.0, 5.0]])), [[0.125, 0.25, 0.625]])


# -- dropout --------------------------------------------------------------------------------------


@FIXTURE_OK
@given(rate=st.floats(0.05, 0.9), dtype=dtypes, seed=st.integers(0, 2**16))
def test_dropout_keeps_the_expected_fraction_scaled(device, rate, dtype, seed):
    shape = (20, 50, 10)
    mask = A.dropout_mask(shape, rate=rate, generator=np.random.default_rng(seed), dtype=dtype,
                          like=to_device(np.zeros(1), device))
    mask = to_numpy(mask)
    assert mask.dtype == dtype and mask.shape == shape
    kept = mask != 0
    n = mask.size
    assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)     # 5 sigma
    np.testing.assert_allclose(mask[kept], 1 / (1 - rate), rtol=1e-6)
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(dtype)
    y = A.dropout_forward(to_device(x, device), to_device(mask, device))
    np.testing.assert_allclose(to_numpy(y), A.dropout_reference(x, mask), **TOL[dtype])
    dy = np.ones(shape, dtype)
    np.testing.assert_array_equal(to_numpy(A.dropout_backward(to_device(dy, device),
                                                              to_device(mask, device))), mask)


def test_dropout_repeats_with_a_seed_and_broadcasts_a_noise_shape():
    a = A.dropout_mask((4, 5), rate=0.5, generator=np.random.default_rng(3))
    b = A.dropout_mask((4, 5), rate=0.5, generator=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        A.dropout_mask((3, 3), rate=0.0, generator=np.random.default_rng(0)), 1)
    mask = A.dropout_mask((2, 1, 1, 3), rate=0.5,
                          generator=np.random.default_rng(0))      # whole channels
    y = A.dropout_forward(np.ones((2, 4, 4, 3), np.float32), mask)
    assert np.all(y == y[:, :1, :1, :])
    np.testing.assert_array_equal(A.dropout_reference(np.ones((2, 4, 4, 3), np.float32), mask), y)


# -- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise():
    g = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.0"):
        A.dropout_mask((2, 2), rate=1.0, generator=g)
    with pytest.raises(ValueError, match="rate must be in"):
        A.dropout_mask((2, 2), rate=-0.1, generator=g)
    with pytest.raises(TypeError, match="rate must be a float"):
        A.dropout_mask((2, 2), rate="half", generator=g)
    with pytest.raises(TypeError, match="generator must be"):
        A.dropout_mask((2, 2), rate=0.5, generator=42)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 2\) does not match input of shape"):
        A.dropout_forward(np.ones((2, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"softmax: axis 2 is out of range .* \(3, 4\)"):
        A.softmax_forward(np.ones((3, 4)), axis=2)
    with pytest.raises(TypeError, match="log_softmax: axis must be an int"):
        A.log_softmax_forward(np.ones((3, 4)), axis=(0, 1))
    with pytest.raises(ValueError, match="negative_slope"):
        A.leaky_relu_forward(np.ones(3), alpha=-0.1)
    with pytest.raises(ValueError, match=r"relu_backward: gradient shape \(2,\) differs"):
        A.relu_backward(np.ones(2), np.ones(3))
