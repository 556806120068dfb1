"""kernels.conv2d: fast kernels against the textbook loops, gradients against central differences,
the adjoint identity of the transposed convolution, SciPy's correlate, and bad input."""
import numpy as np
import pytest
import scipy.ndimage
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernels import conv2d as K
from kernels import cpu
from kernels import shapes
from kernels.backend import to_device, to_numpy

from helpers import window_settings, with_device


def conv_settings(max_size=9):
    """A valid convolution: a window plus o output channels."""
    return window_settings(max_size=max_size, o=st.integers(1, 4))


def arrays(rng, s, dtype=np.float64):
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"])).astype(dtype)
    w = rng.standard_normal((*s["kernel"], s["c"], s["o"])).astype(dtype)
    b = rng.standard_normal(s["o"]).astype(dtype)
    return x, w, b


def algorithms_for(s):
    return [None, "im2col"] + (["shifted"] if s["strides"] == (1, 1) else [])


def rel_err(a, b):
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


def numerical_gradients(f, arrays_, eps=1e-6):
    """Central differences of L = sum(f(*arrays) * r), r a fixed random projection; float64."""
    r = np.random.default_rng(7).standard_normal(f(*arrays_).shape)
    grads = []
    for k, a in enumerate(arrays_):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [v.copy() for v in arrays_]
            minus = [v.copy() for v in arrays_]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            g[idx] = (np.sum(f(*plus) * r) - np.sum(f(*minus) * r)) / (2 * eps)
        grads.append(g)
    return r, grads


# --------------------------------------------------------------------------- forward

@with_device
@given(s=conv_settings())
def test_forward_matches_reference(s, device):
    rng = np.random.default_rng(0)
    x, w, b = arrays(rng, s)
    expected = K.conv2d_reference(x, w, b, s["strides"], s["dilation"], s["padding"])
    for algorithm in algorithms_for(s):
        y = K.conv2d_forward(to_device(x, device), to_device(w, device), to_device(b, device),
                             s["strides"], s["dilation"], s["padding"], algorithm=algorithm)
        assert rel_err(y, expected) < 1e-10, algorithm


@with_device
@given(s=conv_settings())
def test_backward_matches_reference(s, device):
    rng = np.random.default_rng(1)
    x, w, _ = arrays(rng, s)
    y = K.conv2d_reference(x, w, None, s["strides"], s["dilation"], s["padding"])
    gy = rng.standard_normal(y.shape)
    dx_ref, dw_ref, db_ref = K.conv2d_backward_reference(x, w, gy, s["strides"], s["dilation"],
                                                         s["padding"])
    xd, wd, gd = (to_device(a, device) for a in (x, w, gy))
    for algorithm in algorithms_for(s):
        dx, dw, db = K.conv2d_backward(gd, xd, wd, s["strides"], s["dilation"], s["padding"],
                                       algorithm=algorithm)
        assert rel_err(dx, dx_ref) < 1e-10 and rel_err(dw, dw_ref) < 1e-10, algorithm
        assert rel_err(db, db_ref) < 1e-10
        # The same through the one-gradient entry points and the forward's workspace.
        _, workspace = K.conv2d_forward(xd, wd, None, s["strides"], s["dilation"], s["padding"],
                                        algorithm=algorithm, return_workspace=True)
        dw2, db2 = K.conv2d_backward_filter(xd, gd, w.shape, s["strides"], s["dilation"],
                                            s["padding"], workspace=workspace, algorithm=algorithm)
        dx2 = K.conv2d_backward_input(gd, wd, x.shape, s["strides"], s["dilation"], s["padding"],
                                      algorithm=algorithm)
        assert rel_err(dw2, dw_ref) < 1e-10 and rel_err(db2, db_ref) < 1e-10
        assert rel_err(dx2, dx_ref) < 1e-10


@given(s=conv_settings(max_size=5))
def test_gradients_match_central_differences(s):
    assume(s["n"] * s["h"] * s["w"] * s["c"] <= 60)
    rng = np.random.default_rng(2)
    x, w, b = arrays(rng, s)
    settings_ = (s["strides"], s["dilation"], s["padding"])

    def f(x_, w_, b_):
        return K.conv2d_forward(x_, w_, b_, *settings_)

    r, (dx_num, dw_num, db_num) = numerical_gradients(f, [x, w, b])
    dx, dw, db = K.conv2d_backward(r, x, w, *settings_)
    np.testing.assert_allclose(dx, dx_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, dw_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, db_num, rtol=1e-6, atol=1e-8)


@given(s=conv_settings())
def test_adjoint_identity(s):
    """<conv2d(x, w), y> = <x, conv2d_backward_input(y, w)>: the input gradient is the transpose."""
    rng = np.random.default_rng(3)
    x, w, _ = arrays(rng, s)
    settings_ = (s["strides"], s["dilation"], s["padding"])
    y = rng.standard_normal(K.conv2d_forward(x, w, None, *settings_).shape)
    lhs = np.vdot(K.conv2d_forward(x, w, None, *settings_), y)
    rhs = np.vdot(x, K.conv2d_backward_input(y, w, x.shape, *settings_))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


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
    ours = K.conv2d_forward(image[None, :, :, None], weights[:, :, None, None], None, strides,
                            dilation, "valid")[0, :, :, 0]
    interior = full[top:top + image.shape[0] - dilated.shape[0] + 1:strides[0],
                    left:left + image.shape[1] - dilated.shape[1] + 1:strides[1]]
    np.testing.assert_allclose(ours, interior, rtol=1e-12, atol=1e-12)


def test_same_padding_matches_zero_padded_correlate(rng):
    """'same', odd kernel, stride 1: SciPy's correlate with zeros outside, on every pixel."""
    image = rng.standard_normal((9, 8))
    weights = rng.standard_normal((3, 5))
    ours = K.conv2d_forward(image[None, :, :, None], weights[:, :, None, None], None,
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


@pytest.mark.parametrize("algorithm", [None, "im2col", "shifted"])
def test_float32_stays_float32(algorithm, rng, device):
    x = rng.standard_normal((2, 12, 12, 8))
    w = rng.standard_normal((3, 3, 8, 5))
    b = rng.standard_normal(5)
    x32, w32, b32 = (to_device(a.astype(np.float32), device) for a in (x, w, b))
    y = K.conv2d_forward(x32, w32, b32, padding="same", algorithm=algorithm)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(to_numpy(y), K.conv2d_forward(x, w, b, padding="same"),
                               rtol=1e-4, atol=1e-4)
    g = to_device(rng.standard_normal(y.shape).astype(np.float32), device)
    for grad in K.conv2d_backward(g, x32, w32, padding="same", algorithm=algorithm):
        assert grad.dtype == np.float32 and grad.flags.c_contiguous


@pytest.mark.parametrize("kernel, strides, padding, algorithm", [
    ((3, 3), 1, "same", "shifted"), ((3, 3), 1, "valid", "shifted"),
    ((1, 1), 1, "valid", "shifted"),
    ((3, 3), 2, "same", "im2col"), ((1, 1), 1, "valid", "im2col"), ((2, 2), 2, "valid", "im2col"),
])
def test_results_never_share_reused_buffers(kernel, strides, padding, algorithm, rng):
    """A second call must not change what the first returned (the kernels reuse temporaries)."""
    x1, x2 = rng.standard_normal((2, 2, 8, 8, 8))
    w = rng.standard_normal((*kernel, 8, 8))
    y1 = K.conv2d_forward(x1, w, None, strides, 1, padding, algorithm=algorithm)
    g1 = rng.standard_normal(y1.shape)
    dx1, dw1, _ = K.conv2d_backward(g1, x1, w, strides, 1, padding, algorithm=algorithm)
    t1 = K.conv2d_transpose_forward(g1, w, None, strides, 1, padding, algorithm=algorithm)
    saved = [a.copy() for a in (y1, dx1, dw1, t1)]
    y2 = K.conv2d_forward(x2, w, None, strides, 1, padding, algorithm=algorithm)
    K.conv2d_backward(-g1, x2, w, strides, 1, padding, algorithm=algorithm)
    K.conv2d_transpose_forward(y2, w, None, strides, 1, padding, algorithm=algorithm)
    for before, after in zip(saved, (y1, dx1, dw1, t1)):
        np.testing.assert_array_equal(before, after)


def test_backward_skips_what_is_not_needed(rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 3))
    g = rng.standard_normal((1, 4, 4, 3))
    dx, dw, db = K.conv2d_backward(g, x, w, need_input=False)
    assert dx is None and dw is not None and db is not None
    dx, dw, db = K.conv2d_backward(g, None, w, need_filter=False, need_bias=False,
                                   x_shape=x.shape)
    assert dw is None and db is None and dx.shape == x.shape


def test_algorithm_choice():
    """im2col for a 3-channel image, strided or 1x1 convolutions; shifted for many channels on
    large images."""
    big = K.conv_geometry("t", (64, 64), (3, 3), 1, 1, "same")
    assert K.choose_algorithm(big, 3) == "im2col"
    assert K.choose_algorithm(big, 32) == "shifted"
    assert K.choose_algorithm(K.conv_geometry("t", (64, 64), (3, 3), 2, 1, "same"), 32) == "im2col"
    assert K.choose_algorithm(K.conv_geometry("t", (64, 64), (1, 1), 1, 1, "same"), 32) == "im2col"
    assert K.choose_algorithm(K.conv_geometry("t", (8, 8), (3, 3), 1, 1, "same"), 256) == "im2col"


# --------------------------------------------------------------------------- transposed

@st.composite
def transpose_settings(draw):
    s = dict(
        n=draw(st.integers(1, 2)), h=draw(st.integers(1, 5)), w=draw(st.integers(1, 5)),
        c_in=draw(st.integers(1, 3)), c_out=draw(st.integers(1, 3)),
        kernel=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        strides=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=draw(st.sampled_from(["valid", "same"])),
    )
    if draw(st.booleans()):
        s["output_padding"] = (draw(st.integers(0, s["strides"][0] - 1)),
                               draw(st.integers(0, s["strides"][1] - 1)))
    else:
        s["output_padding"] = None
    try:
        shapes.conv_transpose2d_geometry((s["h"], s["w"]), s["kernel"], s["strides"],
                                         s["dilation"], s["padding"], s["output_padding"])
    except ValueError:
        assume(False)
    return s


def transpose_args(s):
    return s["strides"], s["dilation"], s["padding"], s["output_padding"]


@with_device
@given(s=transpose_settings())
def test_transpose_forward_matches_reference(s, device):
    rng = np.random.default_rng(4)
    y = rng.standard_normal((s["n"], s["h"], s["w"], s["c_in"]))
    w = rng.standard_normal((*s["kernel"], s["c_out"], s["c_in"]))      # Keras: (kh, kw, out, in)
    b = rng.standard_normal(s["c_out"])
    expected = K.conv2d_transpose_reference(y, w, b, *transpose_args(s))
    out = K.conv2d_transpose_forward(to_device(y, device), to_device(w, device),
                                     to_device(b, device), *transpose_args(s))
    assert out.shape == K.conv2d_transpose_output_shape(y.shape, w.shape, *transpose_args(s))
    assert rel_err(out, expected) < 1e-10


@given(s=transpose_settings())
def test_transpose_is_adjoint_of_forward_twin(s):
    """<conv2d_transpose(y, w), z> = <y, conv2d(z, w)> with the forward twin's padding, and the
    transposed backward returns exactly that conv2d (and conv2d's filter gradient)."""
    rng = np.random.default_rng(5)
    y = rng.standard_normal((s["n"], s["h"], s["w"], s["c_in"]))
    w = rng.standard_normal((*s["kernel"], s["c_out"], s["c_in"]))
    out = K.conv2d_transpose_forward(y, w, None, *transpose_args(s))
    z = rng.standard_normal(out.shape)
    _, pads = shapes.conv_transpose2d_geometry((s["h"], s["w"]), s["kernel"], s["strides"],
                                               s["dilation"], s["padding"], s["output_padding"])
    twin = K.conv2d_forward(z, w, None, s["strides"], s["dilation"], pads)
    assert twin.shape == y.shape
    assert abs(np.vdot(out, z) - np.vdot(y, twin)) <= 1e-10 * max(1.0, abs(np.vdot(out, z)))
    dy, dw, db = K.conv2d_transpose_backward(z, y, w, *transpose_args(s))
    assert rel_err(dy, twin) < 1e-12
    _, dw_twin, _ = K.conv2d_backward(y, z, w, s["strides"], s["dilation"], pads,
                                      need_input=False)
    assert rel_err(dw, dw_twin) < 1e-12
    np.testing.assert_allclose(db, z.sum(axis=(0, 1, 2)))


@given(s=transpose_settings())
def test_transpose_gradients_match_central_differences(s):
    assume(s["n"] * s["h"] * s["w"] * s["c_in"] <= 40)
    rng = np.random.default_rng(6)
    y = rng.standard_normal((s["n"], s["h"], s["w"], s["c_in"]))
    w = rng.standard_normal((*s["kernel"], s["c_out"], s["c_in"]))
    b = rng.standard_normal(s["c_out"])

    def f(y_, w_, b_):
        return K.conv2d_transpose_forward(y_, w_, b_, *transpose_args(s))

    r, (dy_num, dw_num, db_num) = numerical_gradients(f, [y, w, b])
    dy, dw, db = K.conv2d_transpose_backward(r, y, w, *transpose_args(s))
    np.testing.assert_allclose(dy, dy_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, dw_num, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, db_num, rtol=1e-6, atol=1e-8)


def test_transpose_k2_s2_tiles_the_kernel(rng):
    """The U-Net up-sampling: every input pixel becomes its own 2x2 block, w[:, :, :, in] . y."""
    y = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((2, 2, 6, 5))
    out = K.conv2d_transpose_forward(y, w, None, strides=2, padding="same")
    assert out.shape == (2, 6, 8, 6)
    blocks = np.einsum("nhwc,ijoc->nhiwjo", y, w).reshape(2, 6, 8, 6)
    np.testing.assert_allclose(out, blocks, rtol=1e-12)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(strides=0), "stride"),
    (dict(dilation=0), "dilation"),
    (dict(dilation=(3, 1)), "conv2d_forward.*dilation 3"),        # 7 pixels > the 6 of 'valid'
    (dict(padding="full"), "padding"),
    (dict(padding=-1), "non-negative"),
    (dict(algorithm="fft"), "algorithm"),
    (dict(algorithm="shifted", strides=2), "shifted"),
])
def test_invalid_settings_raise(kwargs, message, rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    with pytest.raises(ValueError, match=message):
        K.conv2d_forward(x, w, **kwargs)


def test_bad_shapes_and_dtypes_raise(rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    with pytest.raises(ValueError, match=r"has 3 channels but the kernel of shape \(3, 3, 2, 4\)"):
        K.conv2d_forward(rng.standard_normal((1, 6, 6, 3)), w)
    with pytest.raises(ValueError, match=r"4-D \(N, H, W, C\)"):
        K.conv2d_forward(x[0], w)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        K.conv2d_forward(x, w, np.zeros(3))
    with pytest.raises(TypeError, match="one dtype"):
        K.conv2d_forward(x.astype(np.float32), w)
    with pytest.raises(TypeError, match="floating"):
        K.conv2d_forward(x.astype(np.int64), w.astype(np.int64))
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(1, 4, 4, 4\)"):
        K.conv2d_backward(np.zeros((1, 4, 4, 3)), x, w)
    with pytest.raises(ValueError, match="x_shape"):
        K.conv2d_backward(np.zeros((1, 4, 4, 4)), None, w, need_filter=False)


def test_transpose_bad_input_raises(rng):
    y, w = rng.standard_normal((1, 4, 4, 2)), rng.standard_normal((3, 3, 5, 2))
    with pytest.raises(ValueError, match="output_padding"):
        K.conv2d_transpose_forward(y, w, strides=2, output_padding=2)
    with pytest.raises(ValueError, match="'valid' or 'same'"):
        K.conv2d_transpose_forward(y, w, padding=1)
    with pytest.raises(ValueError, match=r"has 2 channels but the transposed kernel of shape "
                                         r"\(3, 3, 2, 5\) \(kh, kw, out, in\) expects 5"):
        K.conv2d_transpose_forward(y, rng.standard_normal((3, 3, 2, 5)))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        K.conv2d_transpose_forward(y, w, np.zeros(2))


# --------------------------------------------------------------------------- pieces and threads

@pytest.fixture
def in_pieces(monkeypatch):
    """Force the threaded NumPy path on tiny shapes: ``threads`` pieces whatever the size or the
    BLAS, and chunks of 5 rows (so a piece's chunk loop runs several times)."""
    def set_threads(threads):
        monkeypatch.setenv("MINICNN_NUM_THREADS", str(threads))
        monkeypatch.setattr(K, "conv_threads", lambda xp: threads if xp is np else 1)
        monkeypatch.setattr(K, "_PARALLEL_MIN_MACS", 0)
        monkeypatch.setattr(K, "_PARALLEL_MIN_SIZE", 0)
        monkeypatch.setattr(K, "_chunk_rows", lambda values, itemsize: 5)
    return set_threads


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=conv_settings(), threads=st.integers(2, 3))
def test_pieces_and_chunks_match_reference(in_pieces, s, threads):
    """Whole-image pieces, bands of rows (batches that do not share out), chunked row taps, the
    padded dy shared by both gradients: every path against the textbook loops."""
    in_pieces(threads)
    rng = np.random.default_rng(8)
    x, w, b = arrays(rng, s)
    settings_ = (s["strides"], s["dilation"], s["padding"])
    y_ref = K.conv2d_reference(x, w, b, *settings_)
    gy = rng.standard_normal(y_ref.shape)
    dx_ref, dw_ref, db_ref = K.conv2d_backward_reference(x, w, gy, *settings_)
    for algorithm in algorithms_for(s):
        y, workspace = K.conv2d_forward(x, w, b, *settings_, algorithm=algorithm,
                                        return_workspace=True)
        assert rel_err(y, y_ref) < 1e-10, algorithm
        for given_x, given_ws in ((x, None), (None, workspace)):
            dx, dw, db = K.conv2d_backward(gy, given_x, w, *settings_, algorithm=algorithm,
                                           workspace=given_ws, x_shape=x.shape)
            assert rel_err(dx, dx_ref) < 1e-10, algorithm
            assert rel_err(dw, dw_ref) < 1e-10 and rel_err(db, db_ref) < 1e-10, algorithm


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=transpose_settings())
def test_transpose_in_pieces_matches_reference(in_pieces, s):
    in_pieces(2)
    rng = np.random.default_rng(9)
    y = rng.standard_normal((s["n"], s["h"], s["w"], s["c_in"]))
    w = rng.standard_normal((*s["kernel"], s["c_out"], s["c_in"]))
    b = rng.standard_normal(s["c_out"])
    out = K.conv2d_transpose_forward(y, w, b, *transpose_args(s))
    assert rel_err(out, K.conv2d_transpose_reference(y, w, b, *transpose_args(s))) < 1e-10
    g = rng.standard_normal(out.shape)
    _, pads = shapes.conv_transpose2d_geometry((s["h"], s["w"]), s["kernel"], s["strides"],
                                               s["dilation"], s["padding"], s["output_padding"])
    dy, dw, db = K.conv2d_transpose_backward(g, y, w, *transpose_args(s))
    dw_ref = K.conv2d_backward_reference(g, w, y, s["strides"], s["dilation"], pads)[1]
    assert rel_err(dy, K.conv2d_reference(g, w, None, s["strides"], s["dilation"], pads)) < 1e-10
    assert rel_err(dw, dw_ref) < 1e-10
    assert rel_err(db, g.sum(axis=(0, 1, 2))) < 1e-12


def test_pieces_float32_gradients_against_float64(in_pieces, rng):
    """The U-Net's shapes in miniature, float32 in pieces, against the float64 whole-array
    result: the piecewise sums lose no more than float32 rounding."""
    in_pieces(2)
    x = rng.standard_normal((3, 12, 10, 8))
    w = rng.standard_normal((3, 3, 8, 6)) * 0.2
    g = rng.standard_normal((3, 12, 10, 6))
    dx64, dw64, db64 = K.conv2d_backward(g, x, w, padding="same")
    y64 = K.conv2d_forward(x, w, None, padding="same")
    f = [a.astype(np.float32) for a in (x, w, g)]
    y32 = K.conv2d_forward(f[0], f[1], None, padding="same")
    dx32, dw32, db32 = K.conv2d_backward(f[2], f[0], f[1], padding="same")
    for a32, a64 in ((y32, y64), (dx32, dx64), (dw32, dw64), (db32, db64)):
        assert a32.dtype == np.float32
        assert rel_err(a32, a64) < 2e-6


@pytest.mark.parametrize("n, rows, parts", [(8, 5, 2), (3, 7, 2), (1, 9, 2), (1, 1, 4), (6, 4, 4),
                                            (5, 3, 3), (2, 16, 8), (20, 2, 3)])
def test_split_work_covers_every_output_row_once(n, rows, parts):
    pieces = K.split_work(n, rows, parts)
    covered = np.zeros((n, rows), dtype=int)
    for n0, n1, h0, h1 in pieces:
        assert 0 <= n0 < n1 <= n and 0 <= h0 < h1 <= rows
        assert h0 == 0 and h1 == rows or n1 == n0 + 1      # whole images, or one image's band
        covered[n0:n1, h0:h1] += 1
    assert (covered == 1).all()
    sizes = [(n1 - n0) * (h1 - h0) for n0, n1, h0, h1 in pieces]
    if n % parts == 0 or n >= 4 * parts:
        assert len(pieces) == min(n, parts) if n % parts == 0 else len(pieces) == parts
    assert max(sizes) <= 2 * min(sizes) or rows == 1          # shared out about evenly
    assert K.split_work(n, rows, 1) == [(0, n, 0, rows)]


def test_single_threaded_blas_restores_the_thread_count():
    if not cpu.blas_threads_controllable():
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can find")
    gets = [get for get, _ in cpu._blas_state["setters"]]
    before = [get() for get in gets]
    with cpu.single_threaded_blas():
        assert [get() for get in gets] == [1] * len(gets)
        with cpu.single_threaded_blas():                      # nested: still one, restored once
            assert [get() for get in gets] == [1] * len(gets)
        assert [get() for get in gets] == [1] * len(gets)
    assert [get() for get in gets] == before
    with pytest.raises(KeyError):
        with cpu.single_threaded_blas():
            raise KeyError("inside")
    assert [get() for get in gets] == before


def test_retain_freed_memory_is_opt_in_and_applies():
    """Not at import (a fresh interpreter's allocations still page-fault); once called, a freed
    large array's memory is reused without new page faults (glibc only)."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import resource, sys, numpy as np, kernels.cpu as cpu\n"
            "if sys.argv[1] == '1': assert cpu.retain_freed_memory()\n"
            "def step(): a = np.ones(1 << 20); b = np.ones(1 << 20); del a, b   # 2 x 8 MB\n"
            "step(); step(); f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(5): step()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n")
    root = Path(__file__).resolve().parents[2]
    counts = []
    for opt in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", code, opt], capture_output=True, text=True,
                              cwd=root, timeout=60)
        if done.returncode != 0 and "AssertionError" in done.stderr:
            pytest.skip("not glibc: retain_freed_memory changes nothing")
        assert done.returncode == 0, done.stderr
        counts.append(int(done.stdout))
    assert counts[0] > 1000 and counts[1] < 50, counts


# --------------------------------------------------------------------------- the GPU path, wired

class _NumpyInDisguise(type(np)):
    """An array module that is not ``numpy`` but forwards every name to it (CuPy's stand-in)."""

    def __getattr__(self, name):
        return getattr(np, name)


def test_gpu_arrays_take_im2col_and_the_cuda_wrappers(monkeypatch, rng):
    """On CuPy arrays the automatic choice is im2col, in one piece, with the window copy and its
    adjoint dispatched to ``kernels.cuda.im2col_gpu`` / ``col2im_gpu`` (their NumPy twins stand
    in here), and the results are the NumPy path's."""
    from kernels import backend
    disguise = _NumpyInDisguise("cupy_stand_in")
    calls = []

    class FakeCuda:
        @staticmethod
        def im2col_gpu(x, geometry):
            calls.append(("im2col_gpu", x.shape, geometry))
            with backend.array_code_only():
                return K.im2col(x, geometry)

        @staticmethod
        def col2im_gpu(cols, x_shape, geometry):
            calls.append(("col2im_gpu", tuple(x_shape), geometry))
            with backend.array_code_only():
                return K.col2im(cols, x_shape, geometry)

    x = rng.standard_normal((2, 9, 8, 12))
    w = rng.standard_normal((3, 3, 12, 5))
    b = rng.standard_normal(5)
    expected_y = K.conv2d_forward(x, w, b, padding="same")
    g = rng.standard_normal(expected_y.shape)
    expected = K.conv2d_backward(g, x, w, padding="same")
    expected_t = K.conv2d_transpose_forward(g[:, :4, :4], w, None, 2)
    big = K.conv_geometry("t", (64, 64), (3, 3), 1, 1, "same")
    assert K.choose_algorithm(big, 32) == "shifted"
    assert K.choose_algorithm(big, 32, xp=disguise) == "im2col"
    monkeypatch.setattr(K, "get_array_module", lambda *arrays: disguise)
    monkeypatch.setattr(K, "cuda", FakeCuda)
    monkeypatch.setattr(backend, "_cuda_kernels", True)
    y, workspace = K.conv2d_forward(x, w, b, padding="same", return_workspace=True)
    assert calls[-1][0] == "im2col_gpu" and calls[-1][1] == x.shape
    np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-12)
    dx, dw, db = K.conv2d_backward(g, None, w, padding="same", workspace=workspace,
                                   x_shape=x.shape)
    assert calls[-1][0] == "im2col_gpu" and calls[-1][1] == g.shape    # dx: dy's windows
    for actual, wanted in zip((dx, dw, db), expected):
        np.testing.assert_allclose(actual, wanted, rtol=1e-12, atol=1e-12)
    out = K.conv2d_transpose_forward(g[:, :4, :4], w, None, 2)
    assert calls[-1][0] == "col2im_gpu"                                  # stride 2: col2im
    np.testing.assert_allclose(out, expected_t, rtol=1e-12, atol=1e-12)
    calls.clear()
    with backend.array_code_only():                  # switched off: the array code, same values
        y_off = K.conv2d_forward(x, w, b, padding="same")
    assert calls == []
    np.testing.assert_allclose(y_off, expected_y, rtol=1e-12, atol=1e-12)
