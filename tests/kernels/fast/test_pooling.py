"""kernels.fast.pooling held to the plain kernels of kernels.pooling: exact tilings by reshape,
the argmax by Horner's rule (ties included), batches in groups of images on the threads."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kernels import pooling as plain
from kernels.config import settings
from kernels.fast import pooling as F

from helpers import pool_settings


@st.composite
def tiling_or_not(draw):
    """Any window, or one that tiles the image exactly (the reshape path)."""
    if draw(st.booleans()):
        return draw(pool_settings())
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = (n, pool[0] * draw(st.integers(1, 3)), pool[1] * draw(st.integers(1, 3)), c)
    return shape, pool, draw(st.sampled_from([None, pool])), "valid"


@given(setting=tiling_or_not(), ties=st.booleans(), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_max_pool_equals_the_plain_kernel(setting, ties, threads, seed):
    shape, pool, strides, padding = setting
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=shape) if ties else rng.standard_normal(shape)
    y, argmax = plain.max_pool2d_forward(x, **kw)
    dy = rng.standard_normal(y.shape)
    dx = plain.max_pool2d_backward(dy, argmax, input_size=shape[1:3], **kw)
    with settings.override(threads=threads, parallel_min_bytes=0):
        y_fast, argmax_fast = F.max_pool2d_forward(x, **kw)
        np.testing.assert_array_equal(y_fast, y)
        np.testing.assert_array_equal(argmax_fast, argmax)
        assert argmax_fast.dtype == argmax.dtype
        np.testing.assert_array_equal(F.max_pool2d_forward(x, return_argmax=False, **kw), y)
        np.testing.assert_allclose(F.max_pool2d_backward(dy, argmax, input_size=shape[1:3], **kw),
                                   dx, rtol=1e-12, atol=1e-12)


@given(setting=tiling_or_not(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_avg_pool_equals_the_plain_kernel(setting, dtype, seed):
    shape, pool, strides, padding = setting
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    y = F.avg_pool2d_forward(x, **kw)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, plain.avg_pool2d_forward(x, **kw), **tol)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = F.avg_pool2d_backward(dy, input_size=shape[1:3], **kw)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, plain.avg_pool2d_backward(dy, input_size=shape[1:3], **kw),
                               **tol)
