"""Core layers and activation functions: formulas, gradients, Keras defaults, merges that refuse
mismatched shapes, configs and errors."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn as mc
from minicnn.functions import activations as A
from minicnn.layers.base import Input
from minicnn.layers.core import (Activation, Add, Concatenate, Dense, Dropout, Flatten, LeakyReLU,
                                 ReLU, Softmax)

FORMULAS = {
    "relu": lambda x: np.maximum(x, 0),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.3 * x),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "softmax": lambda x: np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True),
    "log_softmax": lambda x: x - np.log(np.exp(x).sum(axis=-1, keepdims=True)),
    "linear": lambda x: x,
}


def away_from_zero(rng, shape):
    x = rng.standard_normal(shape) * 2
    return np.where(np.abs(x) < 1e-3, 0.5, x)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_activation_layer_and_get_follow_the_formulas(rng, name):
    x = away_from_zero(rng, (2, 3, 4))
    layer = Activation(name)
    np.testing.assert_allclose(layer(mc.Tensor(x)).numpy(), FORMULAS[name](x), rtol=1e-12,
                               atol=1e-14)
    assert A.get(name) is layer.fn
    assert mc.gradcheck(lambda t: A.get(name)(t), x)
    assert Activation(**json.loads(json.dumps(layer.get_config()))).fn is A.get(name)


def test_get_none_callables_and_unknown_names():
    x = mc.Tensor(np.ones(3))
    assert A.get(None)(x) is x
    assert A.get(None) is A.get("linear")
    square = lambda t: t * t   # noqa: E731
    assert A.get(square) is square
    with pytest.raises(ValueError, match=r"unknown name 'gelu'.*'relu'.*'sigmoid'.*'softmax'"):
        A.get("gelu")
    with pytest.raises(TypeError, match="expected a name, a callable or None"):
        A.get(3)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_and_log_softmax_on_any_axis(rng, axis):
    x = rng.standard_normal((3, 4, 2))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(Softmax(axis)(mc.Tensor(x)).numpy(),
                               e / e.sum(axis=axis, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(A.log_softmax(mc.Tensor(x), axis=axis).numpy(),
                               np.log(e / e.sum(axis=axis, keepdims=True)), rtol=1e-12)
    assert mc.gradcheck(lambda t: A.softmax(t, axis=axis), x)
    assert mc.gradcheck(lambda t: A.log_softmax(t, axis=axis), x)


def test_relu_variants_follow_keras():
    x = np.array([-3.0, -1.0, -0.25, 0.5, 1.5, 4.0, 8.0])
    np.testing.assert_array_equal(ReLU()(mc.Tensor(x)).numpy(), np.maximum(x, 0))
    # Keras: x for threshold < x < max_value, clipped at max_value, slope * (x - threshold) below
    y = ReLU(max_value=6, negative_slope=0.1, threshold=1.0)(mc.Tensor(x)).numpy()
    np.testing.assert_allclose(y, [-0.4, -0.2, -0.125, -0.05, 1.5, 4.0, 6.0])
    assert mc.gradcheck(lambda t: ReLU(max_value=6, negative_slope=0.1, threshold=1.0)(t), x)
    np.testing.assert_allclose(LeakyReLU()(mc.Tensor(x)).numpy(), np.where(x >= 0, x, 0.3 * x))
    assert LeakyReLU().negative_slope == 0.3
    assert mc.gradcheck(lambda t: LeakyReLU(0.2)(t), x)
    with pytest.raises(ValueError, match="negative_slope cannot be None or negative"):
        LeakyReLU(-0.1)
    with pytest.raises(ValueError, match="max_value cannot be negative"):
        ReLU(max_value=-1)


# -- dropout --------------------------------------------------------------------------------------


def test_dropout_differs_between_training_and_inference(rng):
    x = mc.Tensor(rng.standard_normal((50, 40)).astype(np.float32) + 5)
    layer = Dropout(0.25, seed=1)
    assert layer(x) is x and layer(x, training=False) is x
    y = layer(x, training=True).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 5 * np.sqrt(0.25 * 0.75 / kept.size)
    np.testing.assert_allclose(y[kept], x.data[kept] / 0.75, rtol=1e-6)
    assert y.dtype == np.float32
    again = Dropout(0.25, seed=1)(x, training=True).numpy()
    np.testing.assert_array_equal(y, again)                     # same seed, same mask
    assert not np.array_equal(y, layer(x, training=True).numpy())   # the next call differs


def test_dropout_package_seed_gradient_and_noise_shape(rng):
    x = rng.standard_normal((2, 4, 4, 3))
    mc.seed(5)
    a = Dropout(0.5)(mc.Tensor(x), training=True).numpy()
    mc.seed(5)
    np.testing.assert_array_equal(Dropout(0.5)(mc.Tensor(x), training=True).numpy(), a)
    t = mc.Tensor(x, requires_grad=True)
    y = Dropout(0.5, seed=3)(t, training=True)
    y.sum().backward()
    np.testing.assert_array_equal(t.grad, (y.numpy() != 0) * 2.0)
    assert mc.gradcheck(lambda v: A.dropout(v, rate=0.5, seed=7), x)
    channels = Dropout(0.5, noise_shape=(None, 1, 1, 3), seed=0)(mc.Tensor(np.ones((2, 4, 4, 3))),
                                                                  training=True).numpy()
    assert np.all(channels == channels[:, :1, :1, :])
    np.testing.assert_array_equal(Dropout(1.0)(mc.Tensor(x), training=True).numpy(), 0)
    with pytest.raises(ValueError, match="rate must be a float between 0 and 1"):
        Dropout(1.5)
    with pytest.raises(ValueError, match=r"noise_shape \(1, 1\) has 2 entries"):
        Dropout(0.5, noise_shape=(1, 1))(mc.Tensor(x), training=True)
    config = json.loads(json.dumps(Dropout(0.3, seed=2).get_config()))
    assert Dropout(**config).rate == 0.3


# -- merges ---------------------------------------------------------------------------------------


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
       n=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_add_and_concatenate_outputs_and_gradients(shape, n, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(shape) for _ in range(n)]
    np.testing.assert_allclose(Add()([mc.Tensor(x) for x in xs]).numpy(), sum(xs), rtol=1e-12)
    assert mc.gradcheck(lambda *ts: Add()(list(ts)), *xs)
    widths = [rng.integers(1, 4) for _ in range(n)]
    parts = [rng.standard_normal(shape[:3] + (w,)) for w in widths]
    np.testing.assert_array_equal(Concatenate()([mc.Tensor(p) for p in parts]).numpy(),
                                  np.concatenate(parts, axis=-1))
    assert mc.gradcheck(lambda *ts: Concatenate()(list(ts)), *parts)
    rows = [rng.standard_normal((shape[0], w) + shape[2:]) for w in widths]
    np.testing.assert_array_equal(Concatenate(axis=1)([mc.Tensor(r) for r in rows]).numpy(),
                                  np.concatenate(rows, axis=1))


def test_merges_refuse_mismatched_shapes_loudly():
    a, b = mc.Tensor(np.zeros((2, 8, 8, 4))), mc.Tensor(np.zeros((2, 7, 7, 4)))
    with pytest.raises(ValueError, match=r"Add '.*': .* \(2, 8, 8, 4\) and \(2, 7, 7, 4\)"):
        Add()([a, b])
    with pytest.raises(ValueError, match=r"Add '.*': .* \(2, 8, 8, 4\) and \(1, 8, 8, 4\)"):
        Add()([a, mc.Tensor(np.zeros((1, 8, 8, 4)))])          # no broadcasting
    with pytest.raises(ValueError, match=r"Concatenate '.*': .*axis -1.*\(2, 8, 8, 4\) and "
                                         r"\(2, 7, 7, 4\)"):
        Concatenate()([a, b])
    with pytest.raises(ValueError, match=r"\(None, 16, 16, 8\) and \(None, 17, 17, 8\)"):
        Concatenate()([Input((16, 16, 8)), Input((17, 17, 8))])
    with pytest.raises(ValueError, match="expects a list of tensors"):
        Add()(a)
    assert Concatenate()([Input((16, 16, 8)), Input((16, 16, 3))]).shape == (None, 16, 16, 11)
    assert Add()([Input((4, 4, 2)), Input((4, 4, 2))]).shape == (None, 4, 4, 2)


# -- flatten and dense ----------------------------------------------------------------------------


def test_flatten_is_c_order(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(Flatten()(mc.Tensor(x)).numpy(), x.reshape(2, -1))
    assert Flatten()(Input((3, 4, 5))).shape == (None, 60)
    assert Flatten()(Input((None, 4, 5))).shape == (None, None)
    assert mc.gradcheck(lambda t: Flatten()(t), x)


@given(lead=st.sampled_from([(3,), (2, 3), (2, 2, 3)]), units=st.integers(1, 4),
       use_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dense_formula_and_gradients(lead, units, use_bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (5,))
    layer = Dense(units, activation="tanh", use_bias=use_bias, bias_initializer="ones",
                  dtype="float64")
    y = layer(mc.Tensor(x))
    weights = layer.get_weights()
    assert weights[0].shape == (5, units) and len(weights) == (2 if use_bias else 1)
    bias = weights[1] if use_bias else 0
    if use_bias:
        np.testing.assert_array_equal(weights[1], 1)
    np.testing.assert_allclose(y.numpy(), np.tanh(x @ weights[0] + bias), rtol=1e-12)
    assert y.shape == layer.compute_output_shape(x.shape)
    assert mc.gradcheck(lambda t: layer(t), x)
    layer.zero_grad()                                   # gradcheck's backward reached it too
    layer(mc.Tensor(x)).sum().backward()
    pre = x @ weights[0] + bias
    grad_pre = (1 - np.tanh(pre) ** 2).reshape(-1, units)
    np.testing.assert_allclose(layer.kernel.grad, x.reshape(-1, 5).T @ grad_pre, rtol=1e-10)


def test_dense_defaults_config_and_errors():
    layer = Dense(3)
    layer(mc.Tensor(np.ones((2, 4), np.float32)))
    assert [w.name.split("/")[-1] for w in layer.weights] == ["kernel", "bias"]
    limit = np.sqrt(6 / (4 + 3))                               # glorot_uniform
    assert np.all(np.abs(layer.kernel.data) <= limit) and np.all(layer.bias.data == 0)
    config = json.loads(json.dumps(layer.get_config()))
    assert config["activation"] == "linear" and config["units"] == 3
    assert Dense(**config).units == 3
    with pytest.raises(ValueError, match="units must be a positive int"):
        Dense(0)
    with pytest.raises(ValueError, match="kernel_regularizer is not supported"):
        Dense(2, kernel_regularizer="l2")
    with pytest.raises(ValueError, match=r"built for input shape \(2, 4\), got \(2, 5\)"):
        layer(mc.Tensor(np.ones((2, 5), np.float32)))
