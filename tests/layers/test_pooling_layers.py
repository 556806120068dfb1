"""Pooling and up-sampling layers: outputs and gradients equal their docstring formulas, Keras
defaults, shapes, configs and errors."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minicnn as mc
from kernels.backend import to_device
from minicnn.functions import pooling as F
from minicnn.layers.base import Input
from minicnn.layers.pooling import (AveragePooling2D, GlobalAveragePooling2D, MaxPooling2D,
                                    UpSampling2D)

FIXTURE_OK = settings(suppress_health_check=list(settings.default.suppress_health_check)
                      + [HealthCheck.function_scoped_fixture])


def windows(x, pool, strides, padding):
    """Yield (i, j, list of real cells (r, s)) of each pooling window, from the formulas:
    'valid': out = (n - k) // s + 1; 'same': out = ceil(n / s), pad total max((out-1) s + k - n, 0)
    with the smaller half on top/left."""
    n_h, n_w = x.shape[1:3]
    out, before = [], []
    for n, k, s in ((n_h, pool[0], strides[0]), (n_w, pool[1], strides[1])):
        if padding == "valid":
            out.append((n - k) // s + 1)
            before.append(0)
        else:
            o = -(-n // s)
            out.append(o)
            before.append(max((o - 1) * s + k - n, 0) // 2)
    for i in range(out[0]):
        for j in range(out[1]):
            cells = [(i * strides[0] - before[0] + a, j * strides[1] - before[1] + b)
                     for a in range(pool[0]) for b in range(pool[1])]
            yield i, j, out, [(r, c) for r, c in cells if 0 <= r < n_h and 0 <= c < n_w]


def pool_formula(x, pool, strides, padding, reduce):
    result = None
    for i, j, out, cells in windows(x, pool, strides, padding):
        if result is None:
            result = np.empty((x.shape[0], out[0], out[1], x.shape[3]))
        result[:, i, j, :] = reduce(np.stack([x[:, r, c, :] for r, c in cells]), axis=0)
    return result


@st.composite
def layer_settings(draw):
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    strides = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.sampled_from(["valid", "same"]))
    h = draw(st.integers(pool[0], 6))
    w = draw(st.integers(pool[1], 6))
    return (draw(st.integers(1, 2)), h, w, draw(st.integers(1, 3))), pool, strides, padding


@given(setting=layer_settings(), seed=st.integers(0, 2**16))
def test_max_pooling_output_and_gradient(setting, seed):
    shape, pool, strides, padding = setting
    rng = np.random.default_rng(seed)
    x = rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1       # distinct values
    layer = MaxPooling2D(pool, strides, padding)
    y = layer(mc.Tensor(x))
    expected = pool_formula(x, pool, strides or pool, padding, np.max)
    np.testing.assert_array_equal(y.numpy(), expected)
    assert layer.compute_output_shape((None,) + shape[1:]) == (None,) + expected.shape[1:]
    assert mc.gradcheck(lambda t: layer(t), x)


@given(setting=layer_settings(), seed=st.integers(0, 2**16))
def test_average_pooling_output_and_gradient(setting, seed):
    shape, pool, strides, padding = setting
    x = np.random.default_rng(seed).standard_normal(shape)
    layer = AveragePooling2D(pool, strides, padding)
    y = layer(mc.Tensor(x))
    np.testing.assert_allclose(y.numpy(), pool_formula(x, pool, strides or pool, padding, np.mean),
                               rtol=1e-12, atol=1e-12)
    assert mc.gradcheck(lambda t: layer(t), x)


def test_max_pooling_gradient_goes_to_the_winner(rng):
    x = rng.permutation(16).reshape(1, 4, 4, 1).astype(np.float32)
    t = mc.Tensor(x, requires_grad=True)
    MaxPooling2D()(t).sum().backward()
    winners = np.zeros_like(x)
    for i in range(2):
        for j in range(2):
            block = x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 0]
            a, b = np.unravel_index(np.argmax(block), (2, 2))
            winners[0, 2 * i + a, 2 * j + b, 0] = 1
    np.testing.assert_array_equal(t.grad, winners)
    assert t.grad.dtype == np.float32


@FIXTURE_OK
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3)),
       keepdims=st.booleans(), seed=st.integers(0, 2**16))
def test_global_average_pooling(device, shape, keepdims, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    layer = GlobalAveragePooling2D(keepdims=keepdims)
    y = layer(mc.Tensor(to_device(x, device)))
    expected = x.mean(axis=(1, 2), keepdims=keepdims)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12)
    assert layer.compute_output_shape((None,) + shape[1:]) == (None,) + expected.shape[1:]
    assert mc.gradcheck(lambda t: layer(t), to_device(x, device))


def bilinear_formula(x, size):
    """Resize along H then W by 1-D linear interpolation at (o + 0.5) / s - 0.5 (np.interp holds
    the edge values beyond the first and last pixel: the clamped edges)."""
    out = x
    for axis, s in ((1, size[0]), (2, size[1])):
        n = out.shape[axis]
        where = (np.arange(n * s) + 0.5) / s - 0.5
        out = np.apply_along_axis(lambda row: np.interp(where, np.arange(n), row), axis, out)
    return out


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 2)),
       size=st.tuples(st.integers(1, 3), st.integers(1, 3)), seed=st.integers(0, 2**16))
def test_upsampling_nearest_and_bilinear(shape, size, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    nearest = UpSampling2D(size)
    np.testing.assert_array_equal(nearest(mc.Tensor(x)).numpy(),
                                  np.repeat(np.repeat(x, size[0], axis=1), size[1], axis=2))
    bilinear = UpSampling2D(size, interpolation="bilinear")
    np.testing.assert_allclose(bilinear(mc.Tensor(x)).numpy(), bilinear_formula(x, size),
                               rtol=1e-12, atol=1e-12)
    assert bilinear.compute_output_shape((None, shape[1], None, shape[3])) == \
        (None, shape[1] * size[0], None, shape[3])
    for layer in (nearest, bilinear):
        assert mc.gradcheck(lambda t: layer(t), x)


def test_defaults_configs_and_symbolic_shapes():
    layer = MaxPooling2D()
    assert (layer.pool_size, layer.strides, layer.padding) == ((2, 2), (2, 2), "valid")
    assert AveragePooling2D(3, strides=1).strides == (1, 1)
    assert UpSampling2D().size == (2, 2) and UpSampling2D().interpolation == "nearest"
    for layer in (MaxPooling2D(3, 2, "same"), AveragePooling2D((2, 3)),
                  GlobalAveragePooling2D(keepdims=True), UpSampling2D(3, interpolation="bilinear")):
        config = json.loads(json.dumps(layer.get_config()))
        config.pop("name")
        twin = type(layer)(**config)
        twin_config = json.loads(json.dumps(twin.get_config()))
        assert {k: v for k, v in twin_config.items() if k != "name"} == config
    inputs = Input((9, 7, 3))
    assert MaxPooling2D()(inputs).shape == (None, 4, 3, 3)
    assert MaxPooling2D(padding="same")(inputs).shape == (None, 5, 4, 3)
    assert GlobalAveragePooling2D()(inputs).shape == (None, 3)
    assert UpSampling2D((2, 3))(inputs).shape == (None, 18, 21, 3)


def test_functions_keep_float32():
    x = mc.Tensor(np.ones((1, 4, 4, 2), np.float32), requires_grad=True)
    for fn in (F.max_pool2d, F.avg_pool2d, F.global_avg_pool2d,
               lambda t: F.upsample2d(t, size=2, interpolation="bilinear")):
        y = fn(x)
        assert y.dtype == np.float32
        y.sum().backward()
        assert x.grad.dtype == np.float32
        x.grad = None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="padding must be 'valid' or 'same'"):
        MaxPooling2D(padding="full")
    with pytest.raises(ValueError, match="channels_last"):
        AveragePooling2D(data_format="channels_first")
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        MaxPooling2D(0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        UpSampling2D(interpolation="bicubic")
    with pytest.raises(ValueError, match=r"expected input of rank 4 .* got shape \(4, 4, 3\)"):
        MaxPooling2D()(mc.Tensor(np.zeros((4, 4, 3))))
    with pytest.raises(ValueError,
                       match=r"MaxPooling2D '.*': input shape \(1, 2, 2, 1\) is too small"):
        MaxPooling2D(3)(mc.Tensor(np.zeros((1, 2, 2, 1))))
