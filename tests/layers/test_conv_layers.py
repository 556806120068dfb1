"""Convolution layers and functions: Keras shapes, weights and counts; outputs against the kernel
reference loops; gradients with minicnn.gradcheck; configs, lazy build and error messages."""
import json

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minicnn as mc
from kernels import conv2d as K
from kernels import depthwise as D
from kernels import shapes
from minicnn.layers import conv as L
from minicnn.layers.base import Input


# --------------------------------------------------------------------------- shapes and weights

# layer, input shape, output shape, weight shapes (Keras order), count_params (worked by hand)
SHAPE_CASES = [
    (lambda: L.Conv2D(4, (5, 5)), (2, 16, 16, 3), (2, 12, 12, 4), [(5, 5, 3, 4), (4,)], 304),
    (lambda: L.Conv2D(2, 3, strides=2, padding="same"), (2, 9, 9, 3), (2, 5, 5, 2),
     [(3, 3, 3, 2), (2,)], 56),
    (lambda: L.Conv2D(8, 3, dilation_rate=2, padding="same"), (1, 10, 11, 3), (1, 10, 11, 8),
     [(3, 3, 3, 8), (8,)], 224),
    (lambda: L.Conv2D(3, (1, 2), use_bias=False), (1, 4, 4, 5), (1, 4, 3, 3), [(1, 2, 5, 3)], 30),
    (lambda: L.Conv2DTranspose(16, 2, strides=2), (2, 5, 5, 4), (2, 10, 10, 16),
     [(2, 2, 16, 4), (16,)], 272),
    (lambda: L.Conv2DTranspose(3, 3, strides=2), (1, 4, 4, 2), (1, 9, 9, 3),
     [(3, 3, 3, 2), (3,)], 57),
    (lambda: L.Conv2DTranspose(3, 3, strides=2, output_padding=1), (1, 4, 4, 2), (1, 10, 10, 3),
     [(3, 3, 3, 2), (3,)], 57),
    (lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same", output_padding=(1, 0)),
     (1, 4, 5, 2), (1, 8, 9, 3), [(3, 3, 3, 2), (3,)], 57),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (2, 8, 8, 3), (2, 6, 6, 6),
     [(3, 3, 3, 2), (6,)], 60),
    (lambda: L.DepthwiseConv2D((3, 1), strides=2, padding="same"), (1, 7, 8, 4), (1, 4, 4, 4),
     [(3, 1, 4, 1), (4,)], 16),
    (lambda: L.SeparableConv2D(4, 3), (2, 8, 8, 3), (2, 6, 6, 4),
     [(3, 3, 3, 1), (1, 1, 3, 4), (4,)], 43),
    (lambda: L.SeparableConv2D(4, 3, strides=2, padding="same", depth_multiplier=2),
     (1, 7, 7, 3), (1, 4, 4, 4), [(3, 3, 3, 2), (1, 1, 6, 4), (4,)], 82),
    (lambda: L.SpatialSeparableConv2D(5, 3), (2, 8, 8, 3), (2, 6, 6, 5),
     [(3, 1, 3, 5), (1, 3, 5, 5), (5,)], 125),
    (lambda: L.SpatialSeparableConv2D(2, (3, 5), strides=2, padding="same"), (1, 7, 9, 1),
     (1, 4, 5, 2), [(3, 1, 1, 2), (1, 5, 2, 2), (2,)], 28),
    (lambda: L.ZeroPadding2D(((1, 2), (3, 4))), (2, 5, 5, 3), (2, 8, 12, 3), [], 0),
    (lambda: L.ZeroPadding2D(2), (2, 5, 5, 3), (2, 9, 9, 3), [], 0),
    (lambda: L.ZeroPadding2D((1, 2)), (2, 5, 5, 3), (2, 7, 9, 3), [], 0),
    (lambda: L.Cropping2D(((1, 2), (0, 1))), (2, 5, 5, 3), (2, 2, 4, 3), [], 0),
    (lambda: L.Cropping2D(1), (2, 5, 6, 3), (2, 3, 4, 3), [], 0),
]


@pytest.mark.parametrize("make, in_shape, out_shape, weight_shapes, params", SHAPE_CASES)
def test_shapes_weights_and_counts(make, in_shape, out_shape, weight_shapes, params, rng):
    layer = make()
    assert layer.weights == [] and not layer.built                 # lazy: nothing before a call
    y = layer(rng.standard_normal(in_shape).astype(np.float32))
    assert y.shape == out_shape and y.dtype == np.float32
    assert layer.compute_output_shape(in_shape) == out_shape
    assert [w.shape for w in layer.weights] == weight_shapes
    assert [w.shape for w in layer.get_weights()] == weight_shapes
    assert layer.count_params() == params


def test_symbolic_input_with_unknown_size():
    inputs = Input((None, None, 3))
    out = L.Conv2D(4, 3, strides=2, padding="same")(inputs)
    assert out.shape == (None, None, None, 4)
    assert L.Conv2DTranspose(2, 2, strides=2)(Input((5, None, 3))).shape == (None, 10, None, 2)
    assert L.Cropping2D(1)(Input((6, 6, 2))).shape == (None, 4, 4, 2)


def test_design_examples():
    """DESIGN.md's examples, shapes and weight count."""
    x = mc.Tensor(np.random.default_rng(0).random((8, 64, 64, 3)).astype("float32"))
    conv = L.Conv2D(filters=4, kernel_size=(5, 5))
    assert conv(x).shape == (8, 60, 60, 4) and conv.count_params() == 304
    assert L.Conv2D(2, (3, 3), strides=(2, 2), padding="same")(x).shape == (8, 32, 32, 2)
    assert L.Conv2D(32, kernel_size=3, dilation_rate=(2, 2), padding="same")(x).shape == \
        (8, 64, 64, 32)
    assert L.SeparableConv2D(4, 3)(x).shape == (8, 62, 62, 4)
    assert L.DepthwiseConv2D(3)(x).shape == (8, 62, 62, 3)
    assert L.Conv2DTranspose(16, 2, strides=2)(x).shape == (8, 128, 128, 16)


# --------------------------------------------------------------------------- outputs

def float64_layer(make):
    return make(dtype="float64")


@given(stride=st.integers(1, 2), padding=st.sampled_from(["valid", "same"]),
       dilation=st.integers(1, 2), activation=st.sampled_from([None, "relu", "tanh"]))
def test_conv2d_layer_matches_reference(stride, padding, dilation, activation):
    assume(stride == 1 or dilation == 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 3))
    layer = L.Conv2D(4, (3, 2), strides=stride, padding=padding, dilation_rate=dilation,
                     activation=activation, bias_initializer="glorot_uniform", dtype="float64")
    y = layer(x).numpy()
    kernel, bias = layer.get_weights()
    expected = K.conv2d_reference(x, kernel, bias, strides=stride, dilation=dilation,
                                  padding=padding)
    expected = {None: expected, "relu": np.maximum(expected, 0), "tanh": np.tanh(expected)}
    np.testing.assert_allclose(y, expected[activation], rtol=1e-12, atol=1e-12)


@given(stride=st.integers(1, 2), padding=st.sampled_from(["valid", "same"]),
       output_padding=st.sampled_from([None, 0, 1]))
def test_conv2d_transpose_layer_matches_reference(stride, padding, output_padding):
    assume(output_padding is None or output_padding < stride)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 3))
    layer = L.Conv2DTranspose(2, 3, strides=stride, padding=padding,
                              output_padding=output_padding, dtype="float64",
                              bias_initializer="ones")
    kernel, bias = (layer(x), layer.get_weights())[1]
    output_size, pads = shapes.conv_transpose2d_geometry(
        (4, 5), (3, 3), stride, 1, padding, None if output_padding is None else (output_padding,) * 2)
    expected = K.conv2d_transpose_reference(x, kernel, bias, output_size=output_size,
                                            strides=stride, padding=pads)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_depthwise_and_separable_layers_match_reference(rng):
    x = rng.standard_normal((2, 7, 7, 3))
    depthwise = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", dtype="float64",
                                  bias_initializer="ones")
    y = depthwise(x).numpy()
    kernel, bias = depthwise.get_weights()
    np.testing.assert_allclose(y, D.depthwise_conv2d_reference(x, kernel, bias, padding="same"),
                               rtol=1e-12, atol=1e-14)      # atol: outputs near 0 (sums of ~1)
    separable = L.SeparableConv2D(4, 3, strides=2, depth_multiplier=2, dtype="float64",
                                  bias_initializer="ones")
    y = separable(x).numpy()
    dk, pk, b = separable.get_weights()
    mid = D.depthwise_conv2d_reference(x, dk, strides=2)
    np.testing.assert_allclose(y, K.conv2d_reference(mid, pk, b), rtol=1e-12, atol=1e-14)


@given(stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.sampled_from(["valid", "same"]), kernel=st.tuples(st.integers(1, 4),
                                                                      st.integers(1, 4)))
def test_spatial_separable_is_a_rank_one_kernel(stride, dilation, padding, kernel):
    """(kh x 1) then (1 x kw) equals one (kh x kw) convolution with kernel
    K[i, j, c, f] = sum_m vertical[i, 0, c, m] horizontal[0, j, m, f]."""
    assume(max(stride) == 1 or max(dilation) == 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 7, 2))
    layer = L.SpatialSeparableConv2D(3, kernel, strides=stride, dilation_rate=dilation,
                                     padding=padding, dtype="float64", bias_initializer="ones")
    y = layer(x).numpy()
    vertical, horizontal, bias = layer.get_weights()
    full = np.einsum("icm,jmf->ijcf", vertical[:, 0], horizontal[0])
    np.testing.assert_allclose(y, K.conv2d_reference(x, full, bias, strides=stride,
                                                     dilation=dilation, padding=padding),
                               rtol=1e-10, atol=1e-12)


def test_padding_and_cropping_layers(rng):
    x = rng.standard_normal((1, 3, 4, 2)).astype(np.float32)
    y = L.ZeroPadding2D(((1, 2), (0, 1)))(x).numpy()
    assert y.shape == (1, 6, 5, 2)
    np.testing.assert_array_equal(y[:, 1:4, 0:4], x)
    assert np.count_nonzero(y) == np.count_nonzero(x)
    np.testing.assert_array_equal(L.Cropping2D(((1, 2), (0, 1)))(y).numpy(), y[:, 1:4, 0:4])


def test_layer_trains_under_autograd(rng):
    """Gradients reach every weight of each layer, in the weights' shapes."""
    x = mc.Tensor(rng.standard_normal((2, 8, 8, 3)).astype(np.float32), requires_grad=True)
    for layer in (L.Conv2D(4, 3, padding="same"), L.Conv2DTranspose(2, 2, strides=2),
                  L.DepthwiseConv2D(3, depth_multiplier=2), L.SeparableConv2D(4, 3),
                  L.SpatialSeparableConv2D(3, 3)):
        out = layer(x)
        out.sum().backward()
        for weight in layer.weights:
            assert weight.grad is not None and weight.grad.shape == weight.shape
            assert weight.grad.dtype == np.float32
        layer.zero_grad()


# --------------------------------------------------------------------------- config and weights

@pytest.mark.parametrize("make", [
    lambda: L.Conv2D(4, (3, 5), strides=(1, 2), padding="same", activation="relu",
                     use_bias=False, kernel_initializer="he_normal"),
    lambda: L.Conv2DTranspose(3, 2, strides=2, output_padding=1),
    lambda: L.DepthwiseConv2D(3, depth_multiplier=3, dilation_rate=2),
    lambda: L.SeparableConv2D(4, 3, depth_multiplier=2, pointwise_initializer="zeros"),
    lambda: L.SpatialSeparableConv2D(4, (3, 5)),
    lambda: L.ZeroPadding2D((1, 2)),
    lambda: L.Cropping2D(((1, 0), (2, 3))),
])
def test_config_round_trip(make):
    layer = make()
    config = json.loads(json.dumps(layer.get_config()))
    config.pop("name")
    rebuilt = type(layer)(**config)
    assert json.loads(json.dumps(rebuilt.get_config())) == {**config, "name": rebuilt.name}


def test_defaults_are_keras():
    conv = L.Conv2D(4, 3).get_config()
    assert (conv["strides"], conv["padding"], conv["dilation_rate"], conv["activation"],
            conv["use_bias"], conv["kernel_initializer"], conv["bias_initializer"]) == \
        ((1, 1), "valid", (1, 1), "linear", True, "glorot_uniform", "zeros")
    depthwise = L.DepthwiseConv2D(3).get_config()
    assert depthwise["depth_multiplier"] == 1
    assert depthwise["depthwise_initializer"] == "glorot_uniform"
    assert L.Conv2DTranspose(4, 3).get_config()["output_padding"] is None


def test_set_weights_in_keras_order(rng):
    layer = L.SeparableConv2D(4, 3, depth_multiplier=2)
    x = rng.standard_normal((1, 5, 5, 3)).astype(np.float32)
    layer(x)
    values = [rng.standard_normal(w.shape).astype(np.float32) for w in layer.weights]
    layer.set_weights(values)
    for got, value in zip(layer.get_weights(), values):
        np.testing.assert_array_equal(got, value)
    mid = D.depthwise_conv2d_forward(x, values[0])
    np.testing.assert_allclose(layer(x).numpy(), K.conv2d_forward(mid, values[1], values[2]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depthwise_kernel"):
        layer.set_weights([values[1], values[0], values[2]])


# --------------------------------------------------------------------------- errors

def test_inputs_are_cast_to_the_layer_dtype(rng):
    """As Keras: a float64 or uint8 image batch goes through a float32 layer as float32; a
    tensor that needs a gradient must match (no silent cast in the graph)."""
    layer = L.Conv2D(2, 3)
    assert layer(rng.standard_normal((1, 5, 5, 3))).dtype == np.float32
    assert layer((rng.random((1, 5, 5, 3)) * 255).astype(np.uint8)).dtype == np.float32
    with pytest.raises(TypeError, match="input dtype float64 differs from the layer's float32"):
        layer(mc.Tensor(rng.standard_normal((1, 5, 5, 3)), requires_grad=True))


def test_called_on_other_channels_or_rank_raises(rng):
    layer = L.Conv2D(4, 3, name="c1")
    layer(rng.standard_normal((1, 6, 6, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"Conv2D 'c1'.*\(1, 6, 6, 3\).*\(1, 6, 6, 5\)"):
        layer(rng.standard_normal((1, 6, 6, 5)).astype(np.float32))
    with pytest.raises(ValueError, match=r"Conv2D 'c1': expected input of rank 4.*\(6, 6, 3\)"):
        layer(rng.standard_normal((6, 6, 3)).astype(np.float32))


@pytest.mark.parametrize("make, message", [
    (lambda: L.Conv2D(4, 3, strides=2, dilation_rate=2), "strides > 1.*dilation_rate > 1"),
    (lambda: L.SeparableConv2D(4, 3, strides=(1, 2), dilation_rate=(2, 1)), "strides > 1"),
    (lambda: L.DepthwiseConv2D(3, strides=2, dilation_rate=2), "strides > 1"),
    (lambda: L.Conv2DTranspose(4, 3, strides=2, dilation_rate=2), "strides > 1"),
    (lambda: L.Conv2DTranspose(4, 3, strides=2, output_padding=2), "output_padding.*< .strides"),
    (lambda: L.Conv2D(0, 3), "filters must be a positive int"),
    (lambda: L.Conv2D(4, 0), "kernel_size"),
    (lambda: L.Conv2D(4, 3, strides=0), "strides"),
    (lambda: L.Conv2D(4, 3, padding="full"), "padding must be 'valid' or 'same'"),
    (lambda: L.Conv2D(4, 3, data_format="channels_first"), "channels_last"),
    (lambda: L.Conv2D(4, 3, groups=2), "groups"),
    (lambda: L.Conv2D(4, 3, kernel_regularizer="l2"), "kernel_regularizer"),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=0), "depth_multiplier"),
    (lambda: L.ZeroPadding2D(-1), "padding"),
    (lambda: L.Cropping2D("same"), "cropping"),
])
def test_invalid_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_input_too_small_names_the_layer(rng):
    with pytest.raises(ValueError, match=r"Conv2D 'small': input shape \(1, 4, 4, 2\)"):
        L.Conv2D(2, 5, name="small")(rng.standard_normal((1, 4, 4, 2)).astype(np.float32))
    with pytest.raises(ValueError, match=r"Cropping2D 'crop'.*\(1, 4, 4, 2\)"):
        L.Cropping2D(2, name="crop")(rng.standard_normal((1, 4, 4, 2)).astype(np.float32))
