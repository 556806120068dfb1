"""kernels.depthwise: fast kernels against the loops, gradients against central differences,
Keras' channel order, and bad input."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kernels import conv2d as K
from kernels import depthwise as D
from kernels.backend import to_device, to_numpy

from helpers import window_settings, with_device


def depthwise_settings(max_size=9):
    """A valid depthwise convolution: a window plus a depth multiplier m."""
    return window_settings(max_size=max_size, m=st.integers(1, 3))


def arrays(rng, s):
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"]))
    w = rng.standard_normal((*s["kernel"], s["c"], s["m"]))
    b = rng.standard_normal(s["c"] * s["m"])
    return x, w, b


def settings_of(s):
    return s["strides"], s["dilation"], s["padding"]


def rel_err(a, b):
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@with_device
@given(s=depthwise_settings())
def test_forward_matches_reference(s, device):
    x, w, b = arrays(np.random.default_rng(0), s)
    expected = D.depthwise_conv2d_reference(x, w, b, *settings_of(s))
    y = D.depthwise_conv2d_forward(to_device(x, device), to_device(w, device),
                                   to_device(b, device), *settings_of(s))
    assert rel_err(y, expected) < 1e-10


@with_device
@given(s=depthwise_settings())
def test_backward_matches_reference(s, device):
    rng = np.random.default_rng(1)
    x, w, _ = arrays(rng, s)
    gy = rng.standard_normal(D.depthwise_conv2d_reference(x, w, None, *settings_of(s)).shape)
    expected = D.depthwise_conv2d_backward_reference(x, w, gy, *settings_of(s))
    xd, wd, gd = (to_device(a, device) for a in (x, w, gy))
    got = D.depthwise_conv2d_backward(gd, xd, wd, *settings_of(s))
    for a, e in zip(got, expected):
        assert rel_err(a, e) < 1e-10
    assert rel_err(D.depthwise_conv2d_backward_input(gd, wd, x.shape, *settings_of(s)),
                   expected[0]) < 1e-10
    dw, db = D.depthwise_conv2d_backward_filter(xd, gd, w.shape, *settings_of(s))
    assert rel_err(dw, expected[1]) < 1e-10 and rel_err(db, expected[2]) < 1e-10


@given(s=depthwise_settings(max_size=5))
def test_gradients_match_central_differences(s):
    assume(s["n"] * s["h"] * s["w"] * s["c"] <= 60)
    rng = np.random.default_rng(2)
    x, w, b = arrays(rng, s)
    r = rng.standard_normal(D.depthwise_conv2d_forward(x, w, b, *settings_of(s)).shape)

    def loss(x_, w_, b_):
        return np.sum(D.depthwise_conv2d_forward(x_, w_, b_, *settings_of(s)) * r)

    dx, dw, db = D.depthwise_conv2d_backward(r, x, w, *settings_of(s))
    eps = 1e-6
    for k, (value, analytic) in enumerate(zip((x, w, b), (dx, dw, db))):
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus, minus = [x.copy(), w.copy(), b.copy()], [x.copy(), w.copy(), b.copy()]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@given(s=depthwise_settings())
def test_equals_a_block_diagonal_conv2d(s):
    """Depthwise = conv2d with a kernel that is zero between different channels; output channel
    c*M + m reads input channel c only (Keras / TensorFlow order)."""
    x, w, _ = arrays(np.random.default_rng(3), s)
    c, m = s["c"], s["m"]
    full = np.zeros((*s["kernel"], c, c * m))
    for ch in range(c):
        full[:, :, ch, ch * m:(ch + 1) * m] = w[:, :, ch, :]
    expected = K.conv2d_forward(x, full, None, *settings_of(s))
    assert rel_err(D.depthwise_conv2d_forward(x, w, None, *settings_of(s)), expected) < 1e-10


def test_output_channel_order_is_keras(rng):
    """Channel 1 with multiplier 1 (of 2) lands at output index 1*2 + 1 = 3."""
    x = np.zeros((1, 3, 3, 2))
    x[0, 1, 1, 1] = 1.0                       # a single 1 in channel 1
    w = np.zeros((1, 1, 2, 2))
    w[0, 0, 1, 1] = 5.0
    y = D.depthwise_conv2d_forward(x, w)
    assert y.shape == (1, 3, 3, 4)
    assert y[0, 1, 1, 3] == 5.0 and np.count_nonzero(y) == 1


@pytest.mark.parametrize("strides, padding", [(1, "same"), (1, "valid"), (2, "same"), (2, "valid")])
def test_results_never_share_reused_buffers(strides, padding, rng):
    """A second call must not change what the first returned (the kernels reuse temporaries)."""
    x1, x2 = rng.standard_normal((2, 2, 7, 7, 3))
    for kernel in ((3, 3), (1, 1)):
        w = rng.standard_normal((*kernel, 3, 2))
        y1 = D.depthwise_conv2d_forward(x1, w, None, strides, 1, padding)
        dx1, dw1, _ = D.depthwise_conv2d_backward(y1, x1, w, strides, 1, padding)
        saved = [a.copy() for a in (y1, dx1, dw1)]
        y2 = D.depthwise_conv2d_forward(x2, w, None, strides, 1, padding)
        D.depthwise_conv2d_backward(-y2, x2, w, strides, 1, padding)
        for before, after in zip(saved, (y1, dx1, dw1)):
            np.testing.assert_array_equal(before, after)


def test_float32_stays_float32(rng, device):
    x = to_device(rng.standard_normal((2, 9, 9, 5)).astype(np.float32), device)
    w = to_device(rng.standard_normal((3, 3, 5, 2)).astype(np.float32), device)
    y = D.depthwise_conv2d_forward(x, w, padding="same", strides=2)
    assert y.dtype == np.float32 and y.shape == (2, 5, 5, 10)
    for grad in D.depthwise_conv2d_backward(y, x, w, padding="same", strides=2):
        assert grad.dtype == np.float32


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
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape"):
        D.depthwise_conv2d_backward(np.zeros((1, 4, 4, 2)), x, w)


@given(s=depthwise_settings(max_size=9), blocks=st.sampled_from([2, 3, 5]),
       tile_values=st.sampled_from([1, 6, 1024]))
def test_stride_one_blocks_match_one_block_and_reference(s, blocks, tile_values):
    """The stride-1 path cut into row blocks (on the thread pool, rows tiled by a few
    ``tile_values``) gives the one-block results: forward and dx exactly, dw up to the
    order of the partial sums; all equal to the loops; repeated calls give identical dw."""
    s = dict(s, strides=(1, 1))
    assume(K.conv_geometry("t", (s["h"], s["w"]), s["kernel"], (1, 1), s["dilation"],
                           s["padding"]).out_hw[0] > 0)
    rng = np.random.default_rng(4)
    x, w, b = arrays(rng, s)
    args = (1, s["dilation"], s["padding"])
    expected_y = D.depthwise_conv2d_reference(x, w, b, *args)
    gy = rng.standard_normal(expected_y.shape)
    expected = D.depthwise_conv2d_backward_reference(x, w, gy, *args)
    saved = (D._TILE_VALUES, D._forced_blocks[0])
    try:
        D._TILE_VALUES = tile_values
        results = []
        for forced in (1, blocks, blocks):
            D._forced_blocks[0] = forced
            results.append((D.depthwise_conv2d_forward(x, w, b, *args),
                            *D.depthwise_conv2d_backward(gy, x, w, *args)))
    finally:
        D._TILE_VALUES, D._forced_blocks[0] = saved
    (y1, dx1, dw1, db1), (y2, dx2, dw2, db2), (_, _, dw3, _) = results
    np.testing.assert_array_equal(y2, y1)
    np.testing.assert_array_equal(dx2, dx1)
    np.testing.assert_array_equal(dw3, dw2)
    assert rel_err(dw2, dw1) < 1e-13
    assert rel_err(y2, expected_y) < 1e-10
    for a, e in zip((dx2, dw2, db2), expected):
        assert rel_err(a, e) < 1e-10


def test_stride_one_blocks_cover_rows_in_whole_tiles():
    """row_blocks: contiguous, in order, ends on tile multiples, forced count honoured."""
    assert D.row_blocks(40, 4, parts=3, unit=4) == [(0, 12), (12, 24), (24, 40)]
    assert D.row_blocks(8, 4, parts=5, unit=4) == [(0, 4), (4, 8)]
    assert D.row_blocks(7, 4, parts=1) == [(0, 7)]
    blocks = D.row_blocks(1000, 1 << 12, unit=8)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1000 // 8 * 8
    assert all(a[1] == b[0] and a[1] % 8 == 0 for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stride_one_float32_blocks_stay_float32(dtype, rng):
    x = rng.standard_normal((3, 6, 5, 3)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 2)).astype(dtype)
    saved = (D._TILE_VALUES, D._forced_blocks[0])
    try:
        D._TILE_VALUES, D._forced_blocks[0] = 6, 4
        y = D.depthwise_conv2d_forward(x, w, None, 1, 1, "same")
        dx, dw, db = D.depthwise_conv2d_backward(y, x, w, 1, 1, "same")
    finally:
        D._TILE_VALUES, D._forced_blocks[0] = saved
    assert {a.dtype for a in (y, dx, dw, db)} == {np.dtype(dtype)}
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y64 = D.depthwise_conv2d_reference(x64, w64, None, 1, 1, "same")
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert rel_err(y, y64) < tol
    for a, e in zip((dx, dw, db), D.depthwise_conv2d_backward_reference(x64, w64, y64, 1, 1,
                                                                        "same")):
        assert rel_err(a, e) < 10 * tol
