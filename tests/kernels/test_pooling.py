"""Pooling and up-sampling kernels: fast == reference, gradients == central differences,
hand-computed values, and bad inputs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import pooling as P
from kernels.backend import to_device, to_numpy
from minicnn.gradcheck import numerical_gradient as numerical_grad

FIXTURE_OK = settings(suppress_health_check=list(settings.default.suppress_health_check)
                      + [HealthCheck.function_scoped_fixture])
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def distinct_values(rng, shape, spacing=0.1):
    """A random permutation of distinct values: no ties, and a step of eps never reorders them."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * spacing).astype(np.float64)


@st.composite
def pool_settings(draw, max_pool=3):
    """(x_shape, pool_size, strides, padding) that give a non-empty output."""
    pool = (draw(st.integers(1, max_pool)), draw(st.integers(1, max_pool)))
    strides = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.sampled_from(["valid", "same"]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h = draw(st.integers(pool[0] if padding == "valid" else 1, 7))
    w = draw(st.integers(pool[1] if padding == "valid" else 1, 7))
    return (n, h, w, c), pool, strides, padding


# -- max pooling ----------------------------------------------------------------------------------


@FIXTURE_OK
@given(setting=pool_settings(), dtype=st.sampled_from([np.float32, np.float64]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_max_pool_fast_equals_reference(device, setting, dtype, ties, seed):
    shape, pool, strides, padding = setting
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=shape) if ties else rng.standard_normal(shape)   # ties: few values
    x = x.astype(dtype)
    y, argmax = P.max_pool2d_forward(to_device(x, device), pool, strides, padding)
    y_ref, argmax_ref = P.max_pool2d_reference(x, pool, strides, padding)
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(argmax), argmax_ref)
    assert y.dtype == dtype
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx = P.max_pool2d_backward(to_device(dy, device), argmax, shape, pool, strides, padding)
    dx_ref = P.max_pool2d_backward_reference(dy, argmax_ref, shape, pool, strides, padding)
    np.testing.assert_allclose(to_numpy(dx), dx_ref, **TOL[dtype])
    assert dx.dtype == dtype


@given(setting=pool_settings(), seed=st.integers(0, 2**16))
def test_max_pool_gradient(setting, seed):
    shape, pool, strides, padding = setting
    rng = np.random.default_rng(seed)
    x = distinct_values(rng, shape)
    y, argmax = P.max_pool2d_forward(x, pool, strides, padding)
    projection = rng.standard_normal(y.shape)
    # max pooling is linear between reorderings (values 0.1 apart): a step of 1e-3 is exact and
    # keeps the roundoff of the projected sums far below the tolerance
    numeric = numerical_grad(lambda v: P.max_pool2d_forward(v, pool, strides, padding)[0], x,
                             projection, eps=1e-3)
    analytic = P.max_pool2d_backward(projection, argmax, shape, pool, strides, padding)
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
    dx = P.max_pool2d_backward(np.ones((1, 2, 2, 1)), argmax, x.shape)
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)


def test_max_pool_overlapping_windows_accumulate():
    x = np.array([0, 9, 1, 2, 3], dtype=np.float64).reshape(1, 1, 5, 1)
    y, argmax = P.max_pool2d_forward(x, (1, 3), (1, 1))
    np.testing.assert_array_equal(y.ravel(), [9, 9, 3])
    dx = P.max_pool2d_backward(np.array([1.0, 10.0, 100.0]).reshape(1, 1, 3, 1), argmax,
                               x.shape, (1, 3), (1, 1))
    np.testing.assert_array_equal(dx.ravel(), [0, 11, 0, 0, 100])


def test_max_pool_same_padding_never_wins():
    x = -np.arange(1.0, 10.0).reshape(1, 3, 3, 1)          # all negative: a 0 pad would win
    y, argmax = P.max_pool2d_forward(x, (2, 2), (2, 2), "same")
    np.testing.assert_array_equal(y[0, :, :, 0], [[-1, -3], [-7, -9]])
    dx = P.max_pool2d_backward(np.ones_like(y), argmax, x.shape, (2, 2), (2, 2), "same")
    assert dx.sum() == 4
    assert dx[0, 0, 0, 0] == dx[0, 0, 2, 0] == dx[0, 2, 0, 0] == dx[0, 2, 2, 0] == 1


def test_max_pool_without_argmax_and_odd_sizes_crop():
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    y = P.max_pool2d_forward(x, return_argmax=False)
    assert y.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(y, P.max_pool2d_reference(x)[0])
    y, argmax = P.max_pool2d_forward(x)
    dx = P.max_pool2d_backward(np.ones_like(y), argmax, x.shape)
    assert np.all(dx[:, 4, :, :] == 0) and np.all(dx[:, :, 6, :] == 0)     # never read, zero grad


# -- average pooling ------------------------------------------------------------------------------


@FIXTURE_OK
@given(setting=pool_settings(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_avg_pool_fast_equals_reference(device, setting, dtype, seed):
    shape, pool, strides, padding = setting
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    y = P.avg_pool2d_forward(to_device(x, device), pool, strides, padding)
    np.testing.assert_allclose(to_numpy(y), P.avg_pool2d_reference(x, pool, strides, padding),
                               **TOL[dtype])
    assert y.dtype == dtype
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = P.avg_pool2d_backward(to_device(dy, device), shape, pool, strides, padding)
    np.testing.assert_allclose(to_numpy(dx),
                               P.avg_pool2d_backward_reference(dy, shape, pool, strides, padding),
                               **TOL[dtype])
    assert dx.dtype == dtype


@given(setting=pool_settings(), seed=st.integers(0, 2**16))
def test_avg_pool_gradient(setting, seed):
    shape, pool, strides, padding = setting
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    y = P.avg_pool2d_forward(x, pool, strides, padding)
    projection = rng.standard_normal(y.shape)
    numeric = numerical_grad(lambda v: P.avg_pool2d_forward(v, pool, strides, padding), x,
                             projection)
    analytic = P.avg_pool2d_backward(projection, shape, pool, strides, padding)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_avg_pool_same_excludes_padding():
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    y = P.avg_pool2d_forward(x, (2, 2), (2, 2), "same")    # pads one row/column at bottom/right
    np.testing.assert_allclose(y[0, :, :, 0], [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2],
                                               [(6 + 7) / 2, 8 / 1]])
    ones = np.ones((2, 5, 4, 3))
    np.testing.assert_allclose(P.avg_pool2d_forward(ones, (3, 3), (1, 1), "same"), 1.0)


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
    dx = P.global_avg_pool2d_backward(to_device(dy, device), shape)
    np.testing.assert_allclose(to_numpy(dx), P.global_avg_pool2d_backward_reference(dy, shape),
                               **TOL[dtype])
    dx4 = P.global_avg_pool2d_backward(to_device(dy.reshape(shape[0], 1, 1, -1), device), shape)
    np.testing.assert_allclose(to_numpy(dx4), to_numpy(dx))
    if dtype == np.float64:
        numeric = numerical_grad(P.global_avg_pool2d_forward, x, dy)
        np.testing.assert_allclose(to_numpy(dx), numeric, rtol=1e-6, atol=1e-8)


# -- up-sampling ----------------------------------------------------------------------------------

upsample_settings = dict(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
    size=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    interpolation=st.sampled_from(["nearest", "bilinear"]))


@FIXTURE_OK
@given(**upsample_settings, dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_upsample_fast_equals_reference(device, shape, size, interpolation, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    y = P.upsample2d_forward(to_device(x, device), size, interpolation)
    assert y.shape == (shape[0], shape[1] * size[0], shape[2] * size[1], shape[3])
    assert y.dtype == dtype
    np.testing.assert_allclose(to_numpy(y), P.upsample2d_reference(x, size, interpolation),
                               **TOL[dtype])
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = P.upsample2d_backward(to_device(dy, device), size, interpolation)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(to_numpy(dx),
                               P.upsample2d_backward_reference(dy, size, interpolation),
                               **TOL[dtype])


@given(**upsample_settings, seed=st.integers(0, 2**16))
def test_upsample_gradient(shape, size, interpolation, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    projection = rng.standard_normal(P.upsample2d_forward(x, size, interpolation).shape)
    numeric = numerical_grad(lambda v: P.upsample2d_forward(v, size, interpolation), x, projection)
    analytic = P.upsample2d_backward(projection, size, interpolation)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_upsample_nearest_repeats_rows_and_columns():
    x = np.arange(12).reshape(2, 2, 1, 3).astype(np.float32)     # Keras' docstring example
    y = P.upsample2d_forward(x, (1, 2))
    np.testing.assert_array_equal(y, np.repeat(x, 2, axis=2))
    np.testing.assert_array_equal(P.upsample2d_forward(x, 2), np.repeat(np.repeat(x, 2, 1), 2, 2))


def test_upsample_bilinear_half_pixel_centres_clamped_edges():
    # output o samples (o + 0.5) / 2 - 0.5: -0.25, 0.25, 0.75, ... , 3.25, clamped to [0, 3]
    x = np.array([0.0, 1.0, 2.0, 4.0]).reshape(1, 1, 4, 1)
    y = P.upsample2d_forward(x, (1, 2), "bilinear")
    np.testing.assert_allclose(y.ravel(), [0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 4])
    # factor 3: offsets -1/3, 0, +1/3
    y = P.upsample2d_forward(x.reshape(1, 4, 1, 1), (3, 1), "bilinear")
    np.testing.assert_allclose(y.ravel(), [0, 0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 8 / 3,
                                           10 / 3, 4, 4])
    # separable: a 2-D ramp stays the product of 1-D interpolations
    img = np.outer([0.0, 1.0], [0.0, 2.0]).reshape(1, 2, 2, 1)
    y = P.upsample2d_forward(img, 2, "bilinear")[0, :, :, 0]
    rows = np.array([0, 0.25, 0.75, 1])
    np.testing.assert_allclose(y, np.outer(rows, 2 * rows))


# -- bad inputs -----------------------------------------------------------------------------------


def test_bad_inputs_raise():
    x = np.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"max_pool2d: expected images of shape \(N, H, W, C\)"):
        P.max_pool2d_forward(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match=r"avg_pool2d: input of shape \(1, 4, 4, 2\).*empty"):
        P.avg_pool2d_forward(x, (5, 5))
    with pytest.raises(ValueError, match="strides must be >= 1"):
        P.max_pool2d_forward(x, (2, 2), (0, 1))
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        P.max_pool2d_forward(x, 0)
    with pytest.raises(ValueError, match="padding must be 'valid', 'same'"):
        P.avg_pool2d_forward(x, 2, 2, "full")
    y, argmax = P.max_pool2d_forward(x)
    with pytest.raises(ValueError, match=r"dy of shape \(1, 3, 3, 2\) does not match"):
        P.max_pool2d_backward(np.zeros((1, 3, 3, 2)), argmax, x.shape)
    with pytest.raises(ValueError, match=r"dy of shape \(1, 2, 2, 3\) does not fit input"):
        P.global_avg_pool2d_backward(np.zeros((1, 2, 2, 3)), x.shape)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        P.upsample2d_forward(x, 2, "bicubic")
    with pytest.raises(ValueError, match="size must be >= 1"):
        P.upsample2d_forward(x, (0, 2))
    with pytest.raises(ValueError, match=r"not a multiple of size \(2, 2\)"):
        P.upsample2d_backward(np.zeros((1, 5, 4, 2)), 2)


@pytest.mark.parametrize("threads", ["2", "3"])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setting=pool_settings(), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_max_pool_in_image_groups_equals_reference(monkeypatch, threads, setting, ties, seed):
    """Large batches are pooled in groups of images on the kernel threads: forced here on
    small ones (every batch size, groups of one image included)."""
    monkeypatch.setattr(P, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setenv("MINICNN_NUM_THREADS", threads)
    shape, pool, strides, padding = setting
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=shape) if ties else rng.standard_normal(shape)
    y, argmax = P.max_pool2d_forward(x, pool, strides, padding)
    y_ref, argmax_ref = P.max_pool2d_reference(x, pool, strides, padding)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    np.testing.assert_array_equal(P.max_pool2d_forward(x, pool, strides, padding, False), y_ref)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(P.max_pool2d_backward(dy, argmax, shape, pool, strides, padding),
                               P.max_pool2d_backward_reference(dy, argmax_ref, shape, pool,
                                                               strides, padding), rtol=1e-12)
