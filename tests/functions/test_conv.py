"""minicnn.functions.conv: float64 gradient checks of every convolution on every kernel path
(plain and tuned on the CPU; array code and CUDA on a GPU), the duality the backward passes are
written with, Keras' transposed sizes, and the calling convention."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minicnn as mc
from kernels import conv2d as K
from kernels import depthwise as D
from kernels import shapes
from kernels.backend import to_device, to_numpy
from minicnn.functions import conv as F

from helpers import window_settings, with_device

# Convolutions are linear in each input, so central differences are exact up to rounding:
# tolerances far below minicnn.gradcheck's defaults (a 1e-4 relative slip must fail).
TIGHT = dict(atol=1e-7, rtol=1e-6)


def conv_case():
    """A valid convolution window (helpers.window_settings) on a small image, o outputs."""
    return window_settings(max_size=5, o=st.integers(1, 3)).filter(
        lambda s: s["n"] * s["h"] * s["w"] * s["c"] <= 60)


def settings_of(s):
    return dict(strides=s["strides"], padding=s["padding"], dilation=s["dilation"])


def on(device, *arrays):
    return [to_device(a, device) for a in arrays]


# --------------------------------------------------------------------------- gradient checks

@with_device
@given(s=conv_case())
def test_conv2d_gradcheck(s, kernel_path, device):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"]))
    w = rng.standard_normal((*s["kernel"], s["c"], s["o"]))
    b = rng.standard_normal(s["o"])
    assert mc.gradcheck(lambda x_, w_, b_: F.conv2d(x_, w_, b_, **settings_of(s)),
                        *on(device, x, w, b), **TIGHT)


@with_device
@given(s=conv_case())
def test_depthwise_and_separable_gradcheck(s, kernel_path, device):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"]))
    w = rng.standard_normal((*s["kernel"], s["c"], s["o"]))           # o = depth multiplier
    b = rng.standard_normal(s["c"] * s["o"])
    assert mc.gradcheck(lambda x_, w_, b_: F.depthwise_conv2d(x_, w_, b_, **settings_of(s)),
                        *on(device, x, w, b), **TIGHT)
    pointwise = rng.standard_normal((1, 1, s["c"] * s["o"], 2))
    assert mc.gradcheck(lambda x_, w_, p_: F.separable_conv2d(x_, w_, p_, **settings_of(s)),
                        *on(device, x, w, pointwise), **TIGHT)


@with_device
@given(n=st.integers(1, 4), strides=st.integers(1, 3), kernel=st.integers(1, 3),
       padding=st.sampled_from(["valid", "same"]), output_padding=st.sampled_from([None, 0, 1]),
       dilation=st.integers(1, 2))
def test_conv2d_transpose_gradcheck(n, strides, kernel, padding, output_padding, dilation,
                                    kernel_path, device):
    assume(output_padding is None or output_padding < strides)
    try:
        shapes.conv_transpose2d_geometry((n, n + 1), (kernel, kernel), strides, dilation, padding,
                                         output_padding)
    except ValueError:
        assume(False)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, n, n + 1, 2))
    w = rng.standard_normal((kernel, kernel, 3, 2))
    b = rng.standard_normal(3)
    assert mc.gradcheck(lambda x_, w_, b_: F.conv2d_transpose(
        x_, w_, b_, strides=strides, padding=padding, dilation=dilation,
        output_padding=output_padding), *on(device, x, w, b), **TIGHT)


@with_device
@given(pads=st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                      st.tuples(st.integers(0, 2), st.integers(0, 2))))
def test_pad_and_crop_gradcheck(pads, device):
    x = to_device(np.random.default_rng(6).standard_normal((1, 5, 6, 2)), device)
    assert mc.gradcheck(lambda x_: F.pad2d(x_, pads), x, **TIGHT)
    assert mc.gradcheck(lambda x_: F.crop2d(x_, pads), x, **TIGHT)


# --------------------------------------------------------------------------- the duality

def test_conv2d_backward_is_the_transposed_convolution(rng, kernel_path):
    """dx of conv2d is conv2d_transpose of dy with the same kernel; dw the filter gradient."""
    x = mc.Tensor(rng.standard_normal((2, 7, 6, 3)), requires_grad=True)
    w = mc.Tensor(rng.standard_normal((3, 2, 3, 4)), requires_grad=True)
    b = mc.Tensor(rng.standard_normal(4), requires_grad=True)
    conv = dict(strides=(2, 1), dilation=(1, 2), padding="same")
    y = F.conv2d(x, w, b, **conv)
    g = rng.standard_normal(y.shape)
    y.backward(g)
    np.testing.assert_allclose(x.grad, K.conv2d_transpose(g, w.data, output_size=(7, 6), **conv),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w.grad, K.conv2d_backward_filter(x.data, g, kernel_size=(3, 2),
                                                                **conv), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.grad, g.sum(axis=(0, 1, 2)), rtol=1e-12)


def test_conv2d_transpose_backward_is_the_convolution(rng, kernel_path):
    """dx of a transposed convolution is conv2d of dy (with the twin's padding), dw conv2d's
    filter gradient with the activations swapped."""
    x = mc.Tensor(rng.standard_normal((2, 3, 4, 5)), requires_grad=True)
    w = mc.Tensor(rng.standard_normal((3, 3, 2, 5)), requires_grad=True)
    y = F.conv2d_transpose(x, w, strides=2, padding="same", output_padding=1)
    output_size, pads = shapes.conv_transpose2d_geometry((3, 4), (3, 3), 2, 1, "same", 1)
    assert y.shape == (2, *output_size, 2)
    g = rng.standard_normal(y.shape)
    y.backward(g)
    twin = dict(strides=2, padding=pads)
    np.testing.assert_allclose(x.grad, K.conv2d_forward(g, w.data, **twin), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(w.grad, K.conv2d_backward_filter(g, x.data, kernel_size=(3, 3),
                                                                **twin), rtol=1e-12, atol=1e-12)


def test_backward_honours_needs_input_grad(rng, kernel_path):
    """A constant image gets no gradient and the kernel's gradient is still right; a frozen
    kernel makes the forward keep no input."""
    x = rng.standard_normal((2, 6, 6, 3))
    w = mc.Tensor(rng.standard_normal((3, 3, 3, 4)), requires_grad=True)
    image = mc.Tensor(x)
    y = F.conv2d(image, w, padding="same")
    g = rng.standard_normal(y.shape)
    y.backward(g)
    assert image.grad is None
    np.testing.assert_allclose(w.grad, K.conv2d_backward_reference(x, w.data, g,
                                                                   padding="same")[1], rtol=1e-12)
    for fn in (F.conv2d, F.depthwise_conv2d):
        frozen = mc.Tensor(w.data[..., :1])
        x_var = mc.Tensor(x, requires_grad=True)
        y = fn(x_var, frozen, padding="same")
        assert y.creator.x is None
        y.backward(np.ones(y.shape))
        assert frozen.grad is None and x_var.grad.shape == x.shape


@with_device
@given(s=conv_case())
def test_functions_equal_the_reference_loops(s, kernel_path, device):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"]))
    w = rng.standard_normal((*s["kernel"], s["c"], s["o"]))
    y = F.conv2d(*on(device, x, w), **settings_of(s))
    np.testing.assert_allclose(to_numpy(y.data), K.conv2d_reference(
        x, w, strides=s["strides"], dilation=s["dilation"], padding=s["padding"]),
        rtol=1e-10, atol=1e-12)
    y = F.depthwise_conv2d(*on(device, x, w), **settings_of(s))
    np.testing.assert_allclose(to_numpy(y.data), D.depthwise_conv2d_reference(
        x, w, strides=s["strides"], dilation=s["dilation"], padding=s["padding"]),
        rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the convention

@pytest.mark.parametrize("strides, padding, output_padding, size", [
    (2, "same", None, (6, 8)), (2, "valid", None, (7, 9)), (2, "valid", 1, (8, 10)),
    (1, "valid", None, (5, 6)), (3, "same", 2, (9, 12)),
])
def test_transposed_sizes_follow_keras(strides, padding, output_padding, size, rng):
    """Keras' deconv_output_length: 'same' -> n*s, 'valid' -> n*s + max(k - s, 0), with
    output_padding p -> (n-1)*s + k - 2*pad + p."""
    x, w = rng.standard_normal((1, 3, 4, 2)), rng.standard_normal((3, 3, 5, 2))
    y = F.conv2d_transpose(x, w, strides=strides, padding=padding, output_padding=output_padding)
    assert y.shape == (1, *size, 5)


def test_settings_are_keyword_only_and_named_strides(rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    with pytest.raises(TypeError):
        F.conv2d(x, w, None, 2)
    with pytest.raises(TypeError):
        F.conv2d(x, w, stride=2)
    assert F.conv2d(x, w, strides=2).shape == (1, 2, 2, 4)


def test_transpose_bad_settings_raise(rng):
    x, w = rng.standard_normal((1, 4, 4, 2)), rng.standard_normal((3, 3, 5, 2))
    with pytest.raises(ValueError, match="conv2d_transpose: .*output_padding"):
        F.conv2d_transpose(x, w, strides=2, output_padding=2)
    with pytest.raises(ValueError, match="'valid' or 'same'"):
        F.conv2d_transpose(x, w, padding=1)
    with pytest.raises(ValueError, match=r"has 2 channels but the transposed kernel"):
        F.conv2d_transpose(x, rng.standard_normal((3, 3, 2, 5)))
