"""kernels.depthwise (the plain kernels): against the loops, gradients against central
differences, Keras' channel order, and bad input. The tuned twins are held to these in
tests/kernels/fast/test_depthwise.py."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kernels import conv2d as K
from kernels import depthwise as D
from kernels.backend import to_device

from helpers import numerical_gradients, rel_err, window_settings, with_device


def depthwise_settings(max_size=9):
    """A valid depthwise convolution: a window plus a depth multiplier m."""
    return window_settings(max_size=max_size, m=st.integers(1, 3))


def arrays(rng, s):
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"]))
    w = rng.standard_normal((*s["kernel"], s["c"], s["m"]))
    b = rng.standard_normal(s["c"] * s["m"])
    return x, w, b


def settings_of(s):
    return dict(strides=s["strides"], dilation=s["dilation"], padding=s["padding"])


@with_device
@given(s=depthwise_settings())
def test_forward_matches_reference(s, device):
    x, w, b = arrays(np.random.default_rng(0), s)
    expected = D.depthwise_conv2d_reference(x, w, b, **settings_of(s))
    y = D.depthwise_conv2d_forward(to_device(x, device), to_device(w, device),
                                   to_device(b, device), **settings_of(s))
    assert rel_err(y, expected) < 1e-10


@with_device
@given(s=depthwise_settings())
def test_backward_matches_reference(s, device):
    rng = np.random.default_rng(1)
    x, w, _ = arrays(rng, s)
    gy = rng.standard_normal(D.depthwise_conv2d_reference(x, w, None, **settings_of(s)).shape)
    dx_ref, dw_ref, _ = D.depthwise_conv2d_backward_reference(x, w, gy, **settings_of(s))
    xd, wd, gd = (to_device(a, device) for a in (x, w, gy))
    assert rel_err(D.depthwise_conv2d_backward_input(gd, wd, input_size=x.shape[1:3],
                                                     **settings_of(s)), dx_ref) < 1e-10
    assert rel_err(D.depthwise_conv2d_backward_filter(xd, gd, kernel_size=w.shape[:2],
                                                      **settings_of(s)), dw_ref) < 1e-10


@given(s=depthwise_settings(max_size=5))
def test_gradients_match_central_differences(s):
    assume(s["n"] * s["h"] * s["w"] * s["c"] <= 60)
    x, w, b = arrays(np.random.default_rng(2), s)
    r, (dx_num, dw_num, db_num) = numerical_gradients(
        lambda x_, w_, b_: D.depthwise_conv2d_forward(x_, w_, b_, **settings_of(s)), [x, w, b])
    np.testing.assert_allclose(D.depthwise_conv2d_backward_input(
        r, w, input_size=x.shape[1:3], **settings_of(s)), dx_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(D.depthwise_conv2d_backward_filter(
        x, r, kernel_size=w.shape[:2], **settings_of(s)), dw_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(K.bias_gradient(r), db_num, rtol=1e-6, atol=1e-8)


@given(s=depthwise_settings())
def test_equals_a_block_diagonal_conv2d(s):
    """Depthwise = conv2d with a kernel that is zero between different channels; output channel
    c*M + m reads input channel c only (Keras / TensorFlow order)."""
    x, w, _ = arrays(np.random.default_rng(3), s)
    c, m = s["c"], s["m"]
    full = np.zeros((*s["kernel"], c, c * m))
    for ch in range(c):
        full[:, :, ch, ch * m:(ch + 1) * m] = w[:, :, ch, :]
    expected = K.conv2d_forward(x, full, None, **settings_of(s))
    assert rel_err(D.depthwise_conv2d_forward(x, w, None, **settings_of(s)), expected) < 1e-10


def test_output_channel_order_is_keras(rng):
    """Channel 1 with multiplier 1 (of 2) lands at output index 1*2 + 1 = 3."""
    x = np.zeros((1, 3, 3, 2))
    x[0, 1, 1, 1] = 1.0                       # a single 1 in channel 1
    w = np.zeros((1, 1, 2, 2))
    w[0, 0, 1, 1] = 5.0
    y = D.depthwise_conv2d_forward(x, w)
    assert y.shape == (1, 3, 3, 4)
    assert y[0, 1, 1, 3] == 5.0 and np.count_nonzero(y) == 1


def test_float32_stays_float32(rng, device):
    x = to_device(rng.standard_normal((2, 9, 9, 5)).astype(np.float32), device)
    w = to_device(rng.standard_normal((3, 3, 5, 2)).astype(np.float32), device)
    y = D.depthwise_conv2d_forward(x, w, padding="same", strides=2)
    assert y.dtype == np.float32 and y.shape == (2, 5, 5, 10)
    assert D.depthwise_conv2d_backward_input(y, w, input_size=(9, 9), padding="same",
                                             strides=2).dtype == np.float32
    assert D.depthwise_conv2d_backward_filter(x, y, kernel_size=(3, 3), padding="same",
                                              strides=2).dtype == np.float32


def test_bad_input_raises(rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"has 3 channels but the depthwise kernel"):
        D.depthwise_conv2d_forward(rng.standard_normal((1, 6, 6, 3)), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        D.depthwise_conv2d_forward(x, w, np.zeros(2))
    with pytest.raises(ValueError, match="stride"):
        D.depthwise_conv2d_forward(x, w, strides=0)
    with pytest.raises(ValueError, match="depthwise_conv2d_forward.*kernel of size 7"):
        D.depthwise_conv2d_forward(x, rng.standard_normal((7, 1, 2, 1)))
    with pytest.raises(TypeError, match="one dtype"):
        D.depthwise_conv2d_forward(x.astype(np.float32), w)
    with pytest.raises(ValueError, match=r"grad_y must have the shape \(1, 4, 4, 4\)"):
        D.depthwise_conv2d_backward_input(np.zeros((1, 4, 4, 2)), w, input_size=(6, 6))
    with pytest.raises(ValueError, match=r"not a multiple of x's 2"):
        D.depthwise_conv2d_backward_filter(x, np.zeros((1, 4, 4, 3)), kernel_size=(3, 3))
