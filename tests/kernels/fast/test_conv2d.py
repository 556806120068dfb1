"""kernels.fast.conv2d held to the plain kernels of kernels.conv2d: both algorithms, one piece and
many (whole images, bands of rows), chunked row taps, float32, reused buffers, and the choice of
algorithm. Every setting is changed through mc.config."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import conv2d as plain
from kernels import shapes
from kernels.config import settings
from kernels.fast import conv2d as F
from kernels.fast import runtime

from helpers import rel_err, window_settings

# Tiny shapes in several pieces: every convolution cut over `threads`, chunks of 5 rows.
IN_PIECES = dict(conv_parallel_min_macs=0, parallel_min_bytes=0, conv_chunk_rows=(5, 5))


def conv_settings(max_size=9):
    return window_settings(max_size=max_size, o=st.integers(1, 4))


def algorithms_for(s):
    return [None, "im2col"] + (["shifted"] if s["strides"] == (1, 1) else [])


def settings_of(s):
    return dict(strides=s["strides"], dilation=s["dilation"], padding=s["padding"])


def pieces_possible():
    if not runtime.blas_threads_controllable():
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can hold to one thread: the "
                    "tuned kernels then run as one piece, which the other tests cover")


@given(s=conv_settings(), threads=st.sampled_from([1, 2, 3]), chunked=st.booleans())
def test_every_path_equals_the_plain_kernels(s, threads, chunked):
    """Forward, input gradient, filter gradient and bias gradient, for each algorithm, on one
    thread and in pieces (whole images or bands of rows, chunks of 5 rows)."""
    if threads > 1:
        pieces_possible()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"]))
    w = rng.standard_normal((*s["kernel"], s["c"], s["o"]))
    b = rng.standard_normal(s["o"])
    y = plain.conv2d_forward(x, w, b, **settings_of(s))
    gy = rng.standard_normal(y.shape)
    dx = plain.conv2d_transpose(gy, w, output_size=x.shape[1:3], **settings_of(s))
    dw = plain.conv2d_backward_filter(x, gy, kernel_size=w.shape[:2], **settings_of(s))
    with settings.override(threads=threads, **(IN_PIECES if chunked else {})):
        for algorithm in algorithms_for(s):
            args = dict(settings_of(s), algorithm=algorithm)
            assert rel_err(F.conv2d_forward(x, w, b, **args), y) < 1e-10, algorithm
            assert rel_err(F.conv2d_transpose(gy, w, output_size=x.shape[1:3], **args), dx) \
                < 1e-10, algorithm
            assert rel_err(F.conv2d_backward_filter(x, gy, kernel_size=w.shape[:2], **args),
                           dw) < 1e-10, algorithm
        assert rel_err(F.bias_gradient(gy), plain.bias_gradient(gy)) < 1e-12


@given(s=conv_settings(), threads=st.sampled_from([1, 2]))
def test_transpose_with_a_bias_equals_the_plain_kernel(s, threads):
    if threads > 1:
        pieces_possible()
    rng = np.random.default_rng(1)
    w = rng.standard_normal((*s["kernel"], s["c"], s["o"]))
    g = shapes.conv_geometry("t", (s["h"], s["w"]), s["kernel"], **settings_of(s))
    y = rng.standard_normal((s["n"], *g.out_hw, s["o"]))
    b = rng.standard_normal(s["c"])
    expected = plain.conv2d_transpose(y, w, b, output_size=g.in_hw, **settings_of(s))
    with settings.override(threads=threads, **IN_PIECES):
        assert rel_err(F.conv2d_transpose(y, w, b, output_size=g.in_hw, **settings_of(s)),
                       expected) < 1e-10


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_in_pieces_against_float64(threads, rng):
    """The U-Net's shapes in miniature, float32 in pieces, against float64: the piecewise sums
    lose no more than float32 rounding; results stay float32 and C-contiguous."""
    if threads > 1:
        pieces_possible()
    x = rng.standard_normal((3, 12, 10, 8))
    w = rng.standard_normal((3, 3, 8, 6)) * 0.2
    g = rng.standard_normal((3, 12, 10, 6))
    same = dict(padding="same")

    def four(x_, w_, g_):
        return (F.conv2d_forward(x_, w_, **same),
                F.conv2d_transpose(g_, w_, output_size=(12, 10), **same),
                F.conv2d_backward_filter(x_, g_, kernel_size=(3, 3), **same), F.bias_gradient(g_))
    with settings.override(threads=threads, **IN_PIECES):
        wide = four(x, w, g)
        narrow = four(*(a.astype(np.float32) for a in (x, w, g)))
    for a32, a64 in zip(narrow, wide):
        assert a32.dtype == np.float32 and a32.flags.c_contiguous
        assert rel_err(a32, a64) < 2e-6


@pytest.mark.parametrize("kernel, strides, padding, algorithm", [
    ((3, 3), 1, "same", "shifted"), ((3, 3), 1, "valid", "shifted"),
    ((1, 1), 1, "valid", "shifted"),
    ((3, 3), 2, "same", "im2col"), ((1, 1), 1, "valid", "im2col"), ((2, 2), 2, "valid", "im2col"),
])
def test_results_never_share_reused_buffers(kernel, strides, padding, algorithm, rng):
    """A second call must not change what the first returned (the kernels reuse temporaries)."""
    x1, x2 = rng.standard_normal((2, 2, 8, 8, 8))
    w = rng.standard_normal((*kernel, 8, 8))
    args = dict(strides=strides, padding=padding, algorithm=algorithm)
    y1 = F.conv2d_forward(x1, w, **args)
    g1 = rng.standard_normal(y1.shape)
    firsts = (y1, F.conv2d_transpose(g1, w, output_size=(8, 8), **args),
              F.conv2d_backward_filter(x1, g1, kernel_size=kernel, **args), F.bias_gradient(g1))
    saved = [a.copy() for a in firsts]
    y2 = F.conv2d_forward(x2, w, **args)
    F.conv2d_transpose(-y2, w, output_size=(8, 8), **args)
    F.conv2d_backward_filter(x2, -g1, kernel_size=kernel, **args)
    F.bias_gradient(-g1)
    for before, after in zip(saved, firsts):
        np.testing.assert_array_equal(before, after)


def test_fresh_scratch_gives_the_same_results(rng):
    x, w = rng.standard_normal((2, 9, 9, 8)), rng.standard_normal((3, 3, 8, 4))
    reused = F.conv2d_forward(x, w, padding="same", algorithm="shifted")
    with settings.override(scratch="fresh"):
        np.testing.assert_array_equal(F.conv2d_forward(x, w, padding="same",
                                                       algorithm="shifted"), reused)


def test_algorithm_choice_follows_the_settings():
    """im2col for a 3-channel image, strided or 1x1 convolutions; shifted for many channels on
    large images; both thresholds are mc.config settings."""
    big = shapes.conv_geometry("t", (64, 64), (3, 3), padding="same")
    assert F.choose_algorithm(big, 3) == "im2col"
    assert F.choose_algorithm(big, 32) == "shifted"
    assert F.choose_algorithm(shapes.conv_geometry("t", (64, 64), (3, 3), strides=2,
                                                   padding="same"), 32) == "im2col"
    assert F.choose_algorithm(shapes.conv_geometry("t", (64, 64), (1, 1)), 32) == "im2col"
    small = shapes.conv_geometry("t", (8, 8), (3, 3), padding="same")
    assert F.choose_algorithm(small, 256) == "im2col"                 # waste 100/64 > 1.2
    with settings.override(shifted_max_waste=2.0, shifted_min_channels=2):
        assert F.choose_algorithm(small, 256) == "shifted"
        assert F.choose_algorithm(big, 3) == "shifted"


@pytest.mark.parametrize("kwargs, message", [
    (dict(algorithm="fft"), "algorithm must be one of"),
    (dict(algorithm="shifted", strides=2), "'shifted' needs strides"),
])
def test_bad_algorithms_raise(kwargs, message, rng):
    x, w = rng.standard_normal((1, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))
    with pytest.raises(ValueError, match=message):
        F.conv2d_forward(x, w, **kwargs)


def test_the_checks_are_the_plain_kernels(rng):
    """The tuned twins start from the plain kernels' contract: the same errors."""
    x, w = rng.standard_normal((1, 6, 6, 3)), rng.standard_normal((3, 3, 2, 4))
    for kernel in (plain.conv2d_forward, F.conv2d_forward):
        with pytest.raises(ValueError, match=r"has 3 channels but the kernel"):
            kernel(x, w)


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
@pytest.mark.parametrize("algorithm", ["im2col", "shifted"])
def test_16_bit_arrays_keep_their_dtype_on_both_paths(low, algorithm, rng):
    """Mixed precision runs the convolutions in float16 / bfloat16 (NumPy's bfloat16 product
    comes back as float32: the kernels cast it back)."""
    if low == "bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")
                         .bfloat16)
    else:
        dtype = np.dtype(low)
    x = rng.standard_normal((2, 9, 9, 8)).astype(dtype)
    w = rng.standard_normal((3, 3, 8, 4)).astype(dtype)
    g = rng.standard_normal((2, 9, 9, 4)).astype(dtype)
    same = dict(padding="same")
    for module, extra in ((plain, {}), (F, dict(algorithm=algorithm))):
        results = (module.conv2d_forward(x, w, **same, **extra),
                   module.conv2d_transpose(g, w, output_size=(9, 9), **same, **extra),
                   module.conv2d_backward_filter(x, g, kernel_size=(3, 3), **same, **extra),
                   module.bias_gradient(g))
        assert [a.dtype for a in results] == [dtype] * 4, module.__name__
