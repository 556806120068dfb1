"""minicnn.functions.pooling: float64 gradient checks of pooling and up-sampling on every kernel
path, and the calling convention."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn as mc
from kernels.backend import to_device
from minicnn.functions import pooling as F

from helpers import pool_settings, with_device


def distinct_values(rng, shape, spacing=0.1):
    """No ties, and a step of eps never reorders them (max pooling is then differentiable)."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * spacing).astype(np.float64)


@with_device
@given(setting=pool_settings(), seed=st.integers(0, 2**16))
def test_max_and_average_pooling_gradcheck(setting, seed, kernel_path, device):
    shape, pool, strides, padding = setting
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    x = to_device(distinct_values(np.random.default_rng(seed), shape), device)
    assert mc.gradcheck(lambda t: F.max_pool2d(t, **kw), x, eps=1e-3)
    assert mc.gradcheck(lambda t: F.avg_pool2d(t, **kw), x)


@with_device
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
       size=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       interpolation=st.sampled_from(["nearest", "bilinear"]), keepdims=st.booleans())
def test_upsampling_and_global_pooling_gradcheck(shape, size, interpolation, keepdims,
                                                 kernel_path, device):
    x = to_device(np.random.default_rng(1).standard_normal(shape), device)
    assert mc.gradcheck(lambda t: F.upsample2d(t, size=size, interpolation=interpolation), x)
    assert mc.gradcheck(lambda t: F.global_avg_pool2d(t, keepdims=keepdims), x)


def test_settings_are_keyword_only():
    x = np.zeros((1, 4, 4, 1))
    for fn in (F.max_pool2d, F.avg_pool2d, F.upsample2d):
        with pytest.raises(TypeError):
            fn(x, 2)
    assert F.max_pool2d(x, pool_size=2).shape == (1, 2, 2, 1)
