"""kernels.conv2d (the plain kernels): against the course's loops, gradients against central
differences, the adjoint identity of the transposed convolution, SciPy's correlate, and bad
input. The tuned twins are held to these in tests/kernels/fast/test_conv2d.py."""
import numpy as np
import pytest
import scipy.ndimage
from hypothesis import assume, given
from hypothesis import strategies as st

from kernels import conv2d as K
from kernels import shapes
from kernels.backend import to_device

from helpers import numerical_gradients, rel_err, window_settings, with_device


def conv_settings(max_size=9):
    """A valid convolution: a window plus o output channels."""
    return window_settings(max_size=max_size, o=st.integers(1, 4))


def arrays(rng, s, dtype=np.float64):
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"])).astype(dtype)
    w = rng.standard_normal((*s["kernel"], s["c"], s["o"])).astype(dtype)
    b = rng.standard_normal(s["o"]).astype(dtype)
    return x, w, b


def settings_of(s):
    return dict(strides=s["strides"], dilation=s["dilation"], padding=s["padding"])


# --------------------------------------------------------------------------- against the loops

@with_device
@given(s=conv_settings())
def test_forward_matches_reference(s, device):
    x, w, b = arrays(np.random.default_rng(0), s)
    expected = K.conv2d_reference(x, w, b, **settings_of(s))
    y = K.conv2d_forward(*(to_device(a, device) for a in (x, w, b)), **settings_of(s))
    assert rel_err(y, expected) < 1e-10


@with_device
@given(s=conv_settings())
def test_gradient_kernels_match_reference(s, device):
    rng = np.random.default_rng(1)
    x, w, _ = arrays(rng, s)
    gy = rng.standard_normal(K.conv2d_reference(x, w, **settings_of(s)).shape)
    dx_ref, dw_ref, db_ref = K.conv2d_backward_reference(x, w, gy, **settings_of(s))
    xd, wd, gd = (to_device(a, device) for a in (x, w, gy))
    dx = K.conv2d_transpose(gd, wd, output_size=x.shape[1:3], **settings_of(s))
    dw = K.conv2d_backward_filter(xd, gd, kernel_size=w.shape[:2], **settings_of(s))
    assert rel_err(dx, dx_ref) < 1e-10 and rel_err(dw, dw_ref) < 1e-10
    assert rel_err(K.bias_gradient(gd), db_ref) < 1e-12


@given(s=conv_settings(max_size=5))
def test_gradients_match_central_differences(s):
    assume(s["n"] * s["h"] * s["w"] * s["c"] <= 60)
    x, w, b = arrays(np.random.default_rng(2), s)
    r, (dx_num, dw_num, db_num) = numerical_gradients(
        lambda x_, w_, b_: K.conv2d_forward(x_, w_, b_, **settings_of(s)), [x, w, b])
    np.testing.assert_allclose(K.conv2d_transpose(r, w, output_size=x.shape[1:3],
                                                  **settings_of(s)), dx_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(K.conv2d_backward_filter(x, r, kernel_size=w.shape[:2],
                                                        **settings_of(s)),
                               dw_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(K.bias_gradient(r), db_num, rtol=1e-6, atol=1e-8)


@given(s=conv_settings())
def test_transpose_is_the_adjoint_of_the_forward(s):
    """<conv2d(x, w), y> = <x, conv2d_transpose(y, w)>: the input gradient is the transpose."""
    rng = np.random.default_rng(3)
    x, w, _ = arrays(rng, s)
    y = rng.standard_normal(K.conv2d_forward(x, w, **settings_of(s)).shape)
    lhs = np.vdot(K.conv2d_forward(x, w, **settings_of(s)), y)
    rhs = np.vdot(x, K.conv2d_transpose(y, w, output_size=x.shape[1:3], **settings_of(s)))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


@with_device
@given(s=conv_settings())
def test_transpose_matches_its_reference(s, device):
    """The stamping loops of the transposed convolution, for every padding the convolution takes."""
    rng = np.random.default_rng(4)
    x, w, _ = arrays(rng, s)
    g = shapes.conv_geometry("t", x.shape[1:3], w.shape[:2], **settings_of(s))
    y = rng.standard_normal((s["n"], *g.out_hw, s["o"]))
    b = rng.standard_normal(s["c"])
    expected = K.conv2d_transpose_reference(y, w, b, output_size=x.shape[1:3], **settings_of(s))
    out = K.conv2d_transpose(*(to_device(a, device) for a in (y, w, b)), output_size=x.shape[1:3],
                             **settings_of(s))
    assert rel_err(out, expected) < 1e-10


def test_im2col_and_col2im_are_adjoint(rng):
    g = shapes.conv_geometry("t", (7, 6), (3, 2), strides=(2, 1), dilation=(1, 2), padding="same")
    x = rng.standard_normal((2, 7, 6, 3))
    cols = rng.standard_normal((2, *g.out_hw, 3, 2, 3))
    assert abs(np.vdot(K.im2col(x, g), cols) - np.vdot(x, K.col2im(cols, x.shape, g))) < 1e-10


# --------------------------------------------------------------------------- known values

@pytest.mark.parametrize("kernel, strides, dilation", [
    ((1, 1), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1)), ((2, 5), (1, 1), (1, 1)),
    ((4, 3), (1, 1), (1, 1)), ((3, 3), (2, 1), (1, 1)), ((3, 3), (1, 1), (2, 3)),
])
def test_single_channel_matches_scipy_correlate(kernel, strides, dilation, rng):
    """One channel, 'valid': our output is scipy.ndimage.correlate's on the interior pixels."""
    image = rng.standard_normal((11, 12))
    weights = rng.standard_normal(kernel)
    dilated = np.zeros(((kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1))
    dilated[::dilation[0], ::dilation[1]] = weights
    full = scipy.ndimage.correlate(image, dilated, mode="constant", cval=0.0)
    top, left = dilated.shape[0] // 2, dilated.shape[1] // 2      # SciPy centres the kernel here
    ours = K.conv2d_forward(image[None, :, :, None], weights[:, :, None, None], strides=strides,
                            dilation=dilation)[0, :, :, 0]
    interior = full[top:top + image.shape[0] - dilated.shape[0] + 1:strides[0],
                    left:left + image.shape[1] - dilated.shape[1] + 1:strides[1]]
    np.testing.assert_allclose(ours, interior, rtol=1e-12, atol=1e-12)


def test_same_padding_matches_zero_padded_correlate(rng):
    """'same', odd kernel, stride 1: SciPy's correlate with zeros outside, on every pixel."""
    image = rng.standard_normal((9, 8))
    weights = rng.standard_normal((3, 5))
    ours = K.conv2d_forward(image[None, :, :, None], weights[:, :, None, None],
                            padding="same")[0, :, :, 0]
    np.testing.assert_allclose(ours, scipy.ndimage.correlate(image, weights, mode="constant"),
                               rtol=1e-12, atol=1e-12)


def test_known_values():
    """A 3x3 image and a 2x2 kernel worked by hand."""
    x = np.arange(1.0, 10.0).reshape(1, 3, 3, 1)                # [[1 2 3] [4 5 6] [7 8 9]]
    w = np.array([[1.0, 0.0], [0.0, -1.0]]).reshape(2, 2, 1, 1)  # top-left minus bottom-right
    y = K.conv2d_forward(x, w, np.array([0.5]))
    np.testing.assert_array_equal(y[0, :, :, 0], [[1 - 5 + 0.5, 2 - 6 + 0.5],
                                                  [4 - 8 + 0.5, 5 - 9 + 0.5]])


def test_transpose_k2_s2_tiles_the_kernel(rng):
    """The U-Net up-sampling: every input pixel becomes its own 2x2 block, w[:, :, :, in] . y."""
    y = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((2, 2, 6, 5))
    out = K.conv2d_transpose(y, w, output_size=(6, 8), strides=2)
    blocks = np.einsum("nhwc,ijoc->nhiwjo", y, w).reshape(2, 6, 8, 6)
    np.testing.assert_allclose(out, blocks, rtol=1e-12)


def test_float32_stays_float32(rng, device):
    x, w, b = (to_device(rng.standard_normal(s).astype(np.float32), device)
               for s in ((2, 12, 12, 8), (3, 3, 8, 5), (5,)))
    y = K.conv2d_forward(x, w, b, padding="same")
    g = to_device(rng.standard_normal(y.shape).astype(np.float32), device)
    for a in (y, K.conv2d_transpose(g, w, output_size=(12, 12), padding="same"),
              K.conv2d_backward_filter(x, g, kernel_size=(3, 3), padding="same"),
              K.bias_gradient(g)):
        assert a.dtype == np.float32 and a.flags.c_contiguous


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(strides=0), "stride"),
    (dict(dilation=0), "dilation"),
    (dict(dilation=(3, 1)), "conv2d_forward.*dilation 3"),        # 7 pixels > the 6 of 'valid'
    (dict(padding="full"), "padding"),
    (dict(padding=-1), "non-negative"),
])
def test_invalid_settings_raise(kwargs, message, rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    with pytest.raises(ValueError, match=message):
        K.conv2d_forward(x, w, **kwargs)


def test_settings_are_keyword_only(rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    with pytest.raises(TypeError):
        K.conv2d_forward(x, w, None, 2)


def test_bad_shapes_and_dtypes_raise(rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    with pytest.raises(ValueError, match=r"has 3 channels but the kernel of shape \(3, 3, 2, 4\)"):
        K.conv2d_forward(rng.standard_normal((1, 6, 6, 3)), w)
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, H, W, C\)"):
        K.conv2d_forward(x[0], w)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        K.conv2d_forward(x, w, np.zeros(3))
    with pytest.raises(TypeError, match="one dtype"):
        K.conv2d_forward(x.astype(np.float32), w)
    with pytest.raises(TypeError, match="floating"):
        K.conv2d_forward(x.astype(np.int64), w.astype(np.int64))
    with pytest.raises(ValueError, match=r"grad_y must have the shape \(1, 4, 4, 3\)"):
        K.conv2d_backward_filter(x, np.zeros((1, 5, 4, 3)), kernel_size=(3, 3))


def test_transpose_bad_input_raises(rng):
    y, w = rng.standard_normal((1, 4, 4, 2)), rng.standard_normal((3, 3, 5, 2))
    with pytest.raises(ValueError, match=r"has 2 channels but the transposed kernel of shape "
                                         r"\(3, 3, 2, 5\) \(kh, kw, out, in\) expects 5"):
        K.conv2d_transpose(y, rng.standard_normal((3, 3, 2, 5)), output_size=(6, 6))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        K.conv2d_transpose(y, w, np.zeros(2), output_size=(6, 6))
    with pytest.raises(ValueError, match=r"conv2d_transpose: y must have the shape \(1, 5, 5, 2\)"):
        K.conv2d_transpose(y, w, output_size=(7, 7))       # 7x7 convolves to 5x5, not 4x4
