"""kernels.pooling (the plain kernels): against the loops, gradients against central
differences, hand-computed values, and bad inputs. The tuned twins are held to these in
tests/kernels/fast/test_pooling.py."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import pooling as P
from kernels.backend import to_device, to_numpy
from minicnn.gradcheck import numerical_gradient as numerical_grad

from helpers import pool_settings

FIXTURE_OK = settings(suppress_health_check=list(settings.default.suppress_health_check)
                      + [HealthCheck.function_scoped_fixture])
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def distinct_values(rng, shape, spacing=0.1):
    """A random permutation of distinct values: no ties, and a step of eps never reorders them."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * spacing).astype(np.float64)


# -- max pooling ----------------------------------------------------------------------------------


@FIXTURE_OK
@given(setting=pool_settings(), dtype=st.sampled_from([np.float32, np.float64]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_max_pool_fast_equals_reference(device, setting, dtype, ties, seed):
    shape, pool, strides, padding = setting
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=shape) if ties else rng.standard_normal(shape)   # ties: few values
    x = x.astype(dtype)
    y, argmax = P.max_pool2d_forward(to_device(x, device), **kw)
    y_ref, argmax_ref = P.max_pool2d_reference(x, **kw)
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(argmax), argmax_ref)
    assert y.dtype == dtype
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx = P.max_pool2d_backward(to_device(dy, device), argmax, input_size=shape[1:3], **kw)
    dx_ref = P.max_pool2d_backward_reference(dy, argmax_ref, input_size=shape[1:3], **kw)
    np.testing.assert_allclose(to_numpy(dx), dx_ref, **TOL[dtype])
    assert dx.dtype == dtype


@given(setting=pool_settings(), seed=st.integers(0, 2**16))
def test_max_pool_gradient(setting, seed):
    shape, pool, strides, padding = setting
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    rng = np.random.default_rng(seed)
    x = distinct_values(rng, shape)
    y, argmax = P.max_pool2d_forward(x, **kw)
    projection = rng.standard_normal(y.shape)
    # max pooling is linear between reorderings (values 0.1 apart): a step of 1e-3 is exact and
    # keeps the roundoff of the projected sums far below the tolerance
    numeric = numerical_grad(lambda v: P.max_pool2d_forward(v, **kw)[0], x,
                             projection, eps=1e-3)
    analytic = P.max_pool2d_backward(projection, argmax, input_size=shape[1:3], **kw)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_max_pool_known_values_and_first_winner_on_ties():
    x = np.array([[1, 3, 0, 0],
                  [3, 2, 0, 0],
                  [5, 4, -1, -2],
                  [4, 5, -3, -1]], dtype=np.float64).reshape(1, 4, 4, 1)
    y, argmax = P.max_pool2d_forward(x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[3, 0], [5, -1]])
    # window offsets in row-major order: (0,0)=0 (0,1)=1 (1,0)=2 (1,1)=3; ties -> first
    np.testing.assert_array_equal(argmax[0, :, :, 0], [[1, 0], [0, 0]])
    dx = P.max_pool2d_backward(np.ones((1, 2, 2, 1)), argmax, input_size=(4, 4))
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


def test_max_pool_overlapping_windows_accumulate():
    x = np.array([0, 9, 1, 2, 3], dtype=np.float64).reshape(1, 1, 5, 1)
    y, argmax = P.max_pool2d_forward(x, pool_size=(1, 3), strides=(1, 1))
    np.testing.assert_array_equal(y.ravel(), [9, 9, 3])
    dx = P.max_pool2d_backward(np.array([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1), argmax,
                               input_size=(1, 5), pool_size=(1, 3), strides=(1, 1))
    np.testing.assert_array_equal(dx.ravel(), [0, 11, 0, 0, 100])


def test_max_pool_same_padding_never_wins():
    x = -np.arange(1.0, 10.0).reshape(1, 3, 3, 1)          # all negative: a 0 pad would win
    y, argmax = P.max_pool2d_forward(x, pool_size=2, strides=2, padding="same")
    np.testing.assert_array_equal(y[0, :, :, 0], [[-1, -3], [-7, -9]])
    dx = P.max_pool2d_backward(np.ones_like(y), argmax, input_size=(3, 3), pool_size=2,
                               strides=2, padding="same")
    assert dx.sum() == 4
    assert dx[0, 0, 0, 0] == dx[0, 0, 2, 0] == dx[0, 2, 0, 0] == dx[0, 2, 2, 0] == 1


def test_max_pool_without_argmax_and_odd_sizes_crop():
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    y = P.max_pool2d_forward(x, return_argmax=False)
    assert y.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(y, P.max_pool2d_reference(x)[0])
    y, argmax = P.max_pool2d_forward(x)
    dx = P.max_pool2d_backward(np.ones_like(y), argmax, input_size=x.shape[1:3])
    assert np.all(dx[:, 4, :, :] == 0) and np.all(dx[:, :, 6, :] == 0)     # never read, zero grad


# -- average pooling ------------------------------------------------------------------------------


@FIXTURE_OK
@given(setting=pool_settings(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_avg_pool_fast_equals_reference(device, setting, dtype, seed):
    shape, pool, strides, padding = setting
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    y = P.avg_pool2d_forward(to_device(x, device), **kw)
    np.testing.assert_allclose(to_numpy(y), P.avg_pool2d_reference(x, **kw),
                               **TOL[dtype])
    assert y.dtype == dtype
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = P.avg_pool2d_backward(to_device(dy, device), input_size=shape[1:3], **kw)
    np.testing.assert_allclose(to_numpy(dx),
                               P.avg_pool2d_backward_reference(dy, input_size=shape[1:3], **kw),
                               **TOL[dtype])
    assert dx.dtype == dtype


@given(setting=pool_settings(), seed=st.integers(0, 2**16))
def test_avg_pool_gradient(setting, seed):
    shape, pool, strides, padding = setting
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    y = P.avg_pool2d_forward(x, **kw)
    projection = rng.standard_normal(y.shape)
    numeric = numerical_grad(lambda v: P.avg_pool2d_forward(v, **kw), x,
                             projection)
    analytic = P.avg_pool2d_backward(projection, input_size=shape[1:3], **kw)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_avg_pool_same_excludes_padding():
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    y = P.avg_pool2d_forward(x, pool_size=2, strides=2, padding="same")  # pads a row/column at the end
    np.testing.assert_allclose(y[0, :, :, 0], [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2],
                                               [(6 + 7) / 2, 8 / 1]])
    ones = np.ones((2, 5, 4, 3))
    np.testing.assert_allclose(P.avg_pool2d_forward(ones, pool_size=3, strides=1, padding="same"),
                               1.0)


# -- global average pooling -----------------------------------------------------------------------


@FIXTURE_OK
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4)),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_global_avg_pool(device, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    y = P.global_avg_pool2d_forward(to_device(x, device))
    np.testing.assert_allclose(to_numpy(y), P.global_avg_pool2d_reference(x), **TOL[dtype])
    np.testing.assert_allclose(to_numpy(y), x.mean(axis=(1, 2)), **TOL[dtype])
    assert y.dtype == dtype and y.shape == (shape[0], shape[3])
    assert P.global_avg_pool2d_forward(to_device(x, device), keepdims=True).shape == \
        (shape[0], 1, 1, shape[3])
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = P.global_avg_pool2d_backward(to_device(dy, device), input_size=shape[1:3])
    np.testing.assert_allclose(to_numpy(dx),
                               P.global_avg_pool2d_backward_reference(dy, input_size=shape[1:3]),
                               **TOL[dtype])
    dx4 = P.global_avg_pool2d_backward(to_device(dy.reshape(shape[0], 1, 1, -1), device),
                                       input_size=shape[1:3])
    np.testing.assert_allclose(to_numpy(dx4), to_numpy(dx))
    if dtype == np.float64:
        numeric = numerical_grad(P.global_avg_pool2d_forward, x, dy)
        np.testing.assert_allclose(to_numpy(dx), numeric, rtol=1e-6, atol=1e-8)


# -- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise():
    x = np.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"max_pool2d: x must be 4-D \(N, H, W, C\)"):
        P.max_pool2d_forward(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match=r"avg_pool2d: .*empty.*\(input \(4, 4\), kernel \(5, 5\)"):
        P.avg_pool2d_forward(x, pool_size=5)
    with pytest.raises(ValueError, match="strides must be >= 1"):
        P.max_pool2d_forward(x, pool_size=2, strides=(0, 1))
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        P.max_pool2d_forward(x, pool_size=0)
    with pytest.raises(ValueError, match="padding must be 'valid', 'same'"):
        P.avg_pool2d_forward(x, pool_size=2, padding="full")
    with pytest.raises(TypeError):
        P.max_pool2d_forward(x, 2)                               # settings are keyword-only
    y, argmax = P.max_pool2d_forward(x)
    with pytest.raises(ValueError, match=r"dy must have the shape \(1, 2, 2, 2\)"):
        P.max_pool2d_backward(np.zeros((1, 3, 3, 2)), argmax, input_size=(4, 4))
    with pytest.raises(ValueError, match=r"argmax must have the shape \(1, 2, 2, 2\)"):
        P.max_pool2d_backward(y, argmax[:, :1], input_size=(4, 4))
    with pytest.raises(ValueError, match=r"dy of shape \(1, 2, 2, 3\) must be \(N, C\)"):
        P.global_avg_pool2d_backward(np.zeros((1, 2, 2, 3)), input_size=(4, 4))
