"""BatchNormalization: Keras weights and defaults, training vs inference, moving statistics,
gradients, and errors."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minicnn as mc
from kernels.backend import to_device
from minicnn.functions.normalization import batch_norm
from minicnn.layers.base import Input
from minicnn.layers.normalization import BatchNormalization

FIXTURE_OK = settings(suppress_health_check=list(settings.default.suppress_health_check)
                      + [HealthCheck.function_scoped_fixture])
shapes = st.one_of(
    st.tuples(st.integers(2, 5), st.integers(1, 3)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
).filter(lambda s: np.prod(s[:-1]) >= 2)


def bn_formula(x, mean, var, gamma, beta, eps):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def test_weights_defaults_and_order(rng):
    layer = BatchNormalization()
    assert (layer.axis, layer.momentum, layer.epsilon) == (-1, 0.99, 1e-3)
    layer(mc.Tensor(rng.standard_normal((2, 3, 3, 4)).astype(np.float32)))
    assert [w.name.split("/")[-1] for w in layer.weights] == \
        ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.name.split("/")[-1] for w in layer.trainable_weights] == ["gamma", "beta"]
    assert all(w.shape == (4,) and w.dtype == np.float32 for w in layer.weights)
    np.testing.assert_array_equal(layer.gamma.data, 1)
    np.testing.assert_array_equal(layer.moving_variance.data, 1)
    np.testing.assert_array_equal(layer.beta.data, 0)
    np.testing.assert_array_equal(layer.moving_mean.data, 0)
    assert layer.count_params() == 16
    bare = BatchNormalization(center=False, scale=False)
    bare(mc.Tensor(np.zeros((2, 4))))
    assert [w.name.split("/")[-1] for w in bare.weights] == ["moving_mean", "moving_variance"]


@FIXTURE_OK
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_training_and_inference_follow_the_formulas(device, shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    axes = tuple(range(len(shape) - 1))
    layer = BatchNormalization(momentum=0.9, epsilon=1e-3, dtype="float64")
    layer(mc.Tensor(np.zeros(shape)))                      # builds (inference: no update)
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    moving_mean, moving_var = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    layer.set_weights([gamma, beta, moving_mean, moving_var])
    layer.to(device)
    x = rng.standard_normal(shape) * 2 + 1

    y_inf = layer(mc.Tensor(to_device(x, device)), training=False)
    np.testing.assert_allclose(y_inf.numpy(), bn_formula(x, moving_mean, moving_var, gamma, beta,
                                                         1e-3), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(layer.get_weights()[2], moving_mean)     # not updated

    y_train = layer(mc.Tensor(to_device(x, device)), training=True)
    mean, var = x.mean(axis=axes), x.var(axis=axes)                         # biased variance
    np.testing.assert_allclose(y_train.numpy(), bn_formula(x, mean, var, gamma, beta, 1e-3),
                               rtol=1e-10, atol=1e-12)
    assert not np.allclose(y_train.numpy(), y_inf.numpy())
    got = layer.get_weights()
    np.testing.assert_allclose(got[2], moving_mean * 0.9 + mean * 0.1, rtol=1e-12)
    np.testing.assert_allclose(got[3], moving_var * 0.9 + var * 0.1, rtol=1e-12)
    np.testing.assert_array_equal(got[0], gamma)


def test_moving_statistics_after_k_steps(rng):
    layer = BatchNormalization()             # momentum 0.99
    means, variances = [], []
    for k in range(4):
        x = (rng.standard_normal((4, 3, 3, 2)) * (k + 1) + k).astype(np.float32)
        means.append(x.mean(axis=(0, 1, 2)))
        variances.append(x.var(axis=(0, 1, 2)))
        layer(mc.Tensor(x), training=True)
    want_mean = sum(0.01 * 0.99 ** (3 - i) * m for i, m in enumerate(means))
    want_var = 0.99 ** 4 + sum(0.01 * 0.99 ** (3 - i) * v for i, v in enumerate(variances))
    np.testing.assert_allclose(layer.moving_mean.data, want_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.data, want_var, rtol=1e-5)
    assert layer.moving_mean.dtype == np.float32


def test_frozen_layer_uses_moving_statistics_even_in_training(rng):
    layer = BatchNormalization()
    x = rng.standard_normal((4, 2, 2, 3)) * 3 + 2
    layer(mc.Tensor(x))
    layer.trainable = False
    before = layer.get_weights()
    y = layer(mc.Tensor(x), training=True)
    np.testing.assert_allclose(y.numpy(), bn_formula(x, 0, 1, 1, 0, 1e-3), rtol=1e-6)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_gradients_in_training_and_inference(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    moving_mean, moving_var = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    assert mc.gradcheck(lambda t, g, b: batch_norm(t, g, b, training=True), x, gamma, beta,
                        atol=1e-6, rtol=1e-5)
    assert mc.gradcheck(lambda t, g, b: batch_norm(t, g, b, moving_mean, moving_var), x, gamma,
                        beta)
    layer = BatchNormalization(dtype="float64", center=False)
    assert mc.gradcheck(lambda t: layer(t, training=True), x, atol=1e-6, rtol=1e-5)


def test_layer_gradients_reach_gamma_and_beta(rng):
    x = rng.standard_normal((3, 2, 2, 2))
    layer = BatchNormalization(dtype="float64")
    projection = rng.standard_normal(x.shape)
    y = layer(mc.Tensor(x), training=True)
    (y * mc.Tensor(projection)).sum().backward()
    x_hat = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-3)
    np.testing.assert_allclose(layer.gamma.grad, (projection * x_hat).sum(axis=(0, 1, 2)),
                               rtol=1e-10)
    np.testing.assert_allclose(layer.beta.grad, projection.sum(axis=(0, 1, 2)), rtol=1e-10)
    assert layer.moving_mean.grad is None


def test_other_axis_and_symbolic_input(rng):
    x = rng.standard_normal((3, 2, 4, 4))                  # channels on axis 1
    layer = BatchNormalization(axis=1, dtype="float64")
    y = layer(mc.Tensor(x), training=True)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y.numpy(), (x - mean) / np.sqrt(var + 1e-3), rtol=1e-10, atol=1e-12)
    assert layer.moving_mean.shape == (2,)
    assert BatchNormalization()(Input((5, 5, 3))).shape == (None, 5, 5, 3)


def test_config_round_trip():
    layer = BatchNormalization(momentum=0.9, epsilon=1e-5, center=False, gamma_initializer="zeros")
    config = json.loads(json.dumps(layer.get_config()))
    twin = BatchNormalization(**config)
    assert (twin.momentum, twin.epsilon, twin.center, twin.scale) == (0.9, 1e-5, False, True)
    twin(mc.Tensor(np.ones((2, 3))))
    np.testing.assert_array_equal(twin.gamma.data, 0)


def test_bad_arguments_raise(rng):
    with pytest.raises(ValueError, match="momentum must be in"):
        BatchNormalization(momentum=1.5)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        BatchNormalization(epsilon=0)
    with pytest.raises(ValueError, match="gamma_regularizer is not supported"):
        BatchNormalization(gamma_regularizer="l2")
    layer = BatchNormalization()
    layer(mc.Tensor(np.zeros((2, 3, 3, 4))))
    with pytest.raises(ValueError,
                       match=r"built for input shape \(2, 3, 3, 4\), got \(2, 3, 3, 5\)"):
        layer(mc.Tensor(np.zeros((2, 3, 3, 5))))
    with pytest.raises(ValueError, match="axis 0 is the batch axis"):
        BatchNormalization(axis=0)(mc.Tensor(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="needs moving_mean and moving_variance"):
        batch_norm(mc.Tensor(np.zeros((2, 3))), training=False)


def _twin_layers(rng, c, **kwargs):
    """Two BatchNormalization layers with the same (non-default) weights."""
    weights = [rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c),
               rng.uniform(0.5, 2, c)]
    layers = []
    for _ in range(2):
        layer = BatchNormalization(momentum=0.9, **kwargs)
        layer.build((None, 4, 4, c))
        layer.set_weights([w.astype(layer.gamma.dtype) for w in weights])
        layers.append(layer)
    return layers


@pytest.mark.parametrize("synchronized", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_relu_equals_relu_of_the_layer(rng, synchronized, training):
    """One fused Function when the layer trains on its own batch; a synchronized layer (one
    process here) and inference run the layer then ReLU: the same values, moving statistics
    and gradients either way."""
    from minicnn.layers.core import ReLU
    from minicnn.layers.normalization import batch_norm_relu
    fused_bn, plain_bn = _twin_layers(rng, 3, dtype="float64", synchronized=synchronized)
    x = rng.standard_normal((2, 4, 4, 3)) * 2 + 1
    dz = rng.standard_normal(x.shape)
    xs = [mc.Tensor(x.copy(), requires_grad=True) for _ in range(2)]
    relu = ReLU()
    z = batch_norm_relu(fused_bn, relu, xs[0], training=training)
    expected = ReLU()(plain_bn(xs[1], training=training))
    fused = training and not synchronized
    assert (type(z.creator).__name__ == "BatchNormReLU") == fused
    assert relu.output_shape == z.shape
    np.testing.assert_allclose(z.data, expected.data, rtol=1e-12, atol=1e-12)
    z.backward(dz)
    expected.backward(dz)
    np.testing.assert_allclose(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(fused_bn.weights, plain_bn.weights):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-12, atol=1e-12)
        if a.grad is not None or b.grad is not None:
            np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_batch_norm_relu_keeps_other_activations_apart(rng):
    """A ReLU layer with a threshold is not max(x, 0): the two layers run as they are."""
    from minicnn.layers.core import ReLU
    from minicnn.layers.normalization import batch_norm_relu
    bn, twin = _twin_layers(rng, 2, dtype="float64")
    x = mc.Tensor(rng.standard_normal((2, 4, 4, 2)))
    z = batch_norm_relu(bn, ReLU(threshold=0.5), x, training=True)
    assert type(z.creator).__name__ != "BatchNormReLU"
    np.testing.assert_allclose(z.data, ReLU(threshold=0.5)(twin(x, training=True)).data,
                               rtol=1e-12, atol=1e-12)


def test_batch_norm_relu_under_mixed_precision_keeps_float32_statistics(rng):
    """float16 in and out; the fused Function runs in float32 (statistics, gamma, beta), as
    the layer alone does, and the moving statistics stay float32."""
    from minicnn import mixed_precision as mp
    from minicnn.layers.core import ReLU
    from minicnn.layers.normalization import batch_norm_relu
    x = rng.standard_normal((4, 4, 4, 3)).astype(np.float16)
    previous = mp.global_policy()
    mp.set_global_policy("mixed_float16")
    try:
        bn, twin = _twin_layers(rng, 3)
        z = batch_norm_relu(bn, ReLU(), mc.Tensor(x), training=True)
        expected = ReLU()(twin(mc.Tensor(x), training=True))
    finally:
        mp.set_global_policy(previous)
    assert z.dtype == np.float16 and bn.moving_mean.dtype == np.float32
    assert type(z.creator.inputs[0].creator).__name__ == "BatchNormReLU"
    np.testing.assert_array_equal(z.data, expected.data)
    for a, b in zip(bn.weights, twin.weights):
        np.testing.assert_array_equal(a.data, b.data)
