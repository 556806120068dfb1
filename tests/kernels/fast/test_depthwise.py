"""kernels.fast.depthwise held to the plain kernels of kernels.depthwise: the stride-1 path in row
blocks (one block, several, on the threads, rows tiled), float32, reused buffers."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import depthwise as plain
from kernels.config import settings
from kernels.fast import depthwise as F

from helpers import rel_err, window_settings

# (block bytes, tile values): one block; several small ones, rows tiled by a few
LAYOUTS = st.sampled_from([(1 << 30, 1024), (64, 6), (200, 1), (1, 1024)])


def settings_of(s):
    return dict(strides=s["strides"], dilation=s["dilation"], padding=s["padding"])


@given(s=window_settings(max_size=9, m=st.integers(1, 3)), layout=LAYOUTS,
       threads=st.sampled_from([1, 2, 3]), stride_one=st.booleans())
def test_every_path_equals_the_plain_kernels(s, layout, threads, stride_one):
    """Forward and dx exactly as the plain kernels compute them (up to rounding), dw up to the
    order of the partial sums; the same dw again on a second call (deterministic)."""
    if stride_one:
        s = dict(s, strides=(1, 1))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((s["n"], s["h"], s["w"], s["c"]))
    w = rng.standard_normal((*s["kernel"], s["c"], s["m"]))
    b = rng.standard_normal(s["c"] * s["m"])
    y = plain.depthwise_conv2d_forward(x, w, b, **settings_of(s))
    gy = rng.standard_normal(y.shape)
    dx = plain.depthwise_conv2d_backward_input(gy, w, input_size=x.shape[1:3], **settings_of(s))
    dw = plain.depthwise_conv2d_backward_filter(x, gy, kernel_size=w.shape[:2], **settings_of(s))
    block, tile = layout
    with settings.override(depthwise_block_bytes=block, depthwise_threaded_block_bytes=block,
                           depthwise_tile_values=tile, threads=threads, parallel_min_bytes=0):
        assert rel_err(F.depthwise_conv2d_forward(x, w, b, **settings_of(s)), y) < 1e-10
        assert rel_err(F.depthwise_conv2d_backward_input(gy, w, input_size=x.shape[1:3],
                                                         **settings_of(s)), dx) < 1e-10
        dws = [F.depthwise_conv2d_backward_filter(x, gy, kernel_size=w.shape[:2],
                                                  **settings_of(s)) for _ in range(2)]
    np.testing.assert_array_equal(dws[0], dws[1])
    assert rel_err(dws[0], dw) < 1e-10


def test_row_blocks_cover_rows_in_whole_tiles():
    """row_blocks: contiguous, in order, ends on tile multiples, a given count honoured."""
    assert F.row_blocks(40, 4, parts=3, unit=4) == [(0, 12), (12, 24), (24, 40)]
    assert F.row_blocks(8, 4, parts=5, unit=4) == [(0, 4), (4, 8)]
    assert F.row_blocks(7, 4, parts=1) == [(0, 7)]
    with settings.override(threads=1, depthwise_block_bytes=1 << 14):
        blocks = F.row_blocks(1000, 1 << 12, unit=8)
    assert len(blocks) > 1 and blocks[0][0] == 0 and blocks[-1][1] == 1000 // 8 * 8
    assert all(a[1] == b[0] and a[1] % 8 == 0 for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_keep_the_dtype(dtype, rng):
    x = rng.standard_normal((3, 6, 5, 3)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 2)).astype(dtype)
    with settings.override(depthwise_block_bytes=64, depthwise_tile_values=6):
        y = F.depthwise_conv2d_forward(x, w, padding="same")
        dx = F.depthwise_conv2d_backward_input(y, w, input_size=(6, 5), padding="same")
        dw = F.depthwise_conv2d_backward_filter(x, y, kernel_size=(3, 2), padding="same")
    assert {a.dtype for a in (y, dx, dw)} == {np.dtype(dtype)}
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y64 = plain.depthwise_conv2d_forward(x64, w64, padding="same")
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert rel_err(y, y64) < tol
    assert rel_err(dx, plain.depthwise_conv2d_backward_input(y64, w64, input_size=(6, 5),
                                                             padding="same")) < 10 * tol
    assert rel_err(dw, plain.depthwise_conv2d_backward_filter(x64, y64, kernel_size=(3, 2),
                                                              padding="same")) < 10 * tol


@pytest.mark.parametrize("strides, padding", [(1, "same"), (1, "valid"), (2, "same")])
def test_results_never_share_reused_buffers(strides, padding, rng):
    """A second call must not change what the first returned (the kernels reuse temporaries)."""
    x1, x2 = rng.standard_normal((2, 2, 7, 7, 3))
    args = dict(strides=strides, padding=padding)
    for kernel in ((3, 3), (1, 1)):
        w = rng.standard_normal((*kernel, 3, 2))
        y1 = F.depthwise_conv2d_forward(x1, w, **args)
        firsts = (y1, F.depthwise_conv2d_backward_input(y1, w, input_size=(7, 7), **args),
                  F.depthwise_conv2d_backward_filter(x1, y1, kernel_size=kernel, **args))
        saved = [a.copy() for a in firsts]
        y2 = F.depthwise_conv2d_forward(x2, w, **args)
        F.depthwise_conv2d_backward_input(-y2, w, input_size=(7, 7), **args)
        F.depthwise_conv2d_backward_filter(x2, -y2, kernel_size=kernel, **args)
        for before, after in zip(saved, firsts):
            np.testing.assert_array_equal(before, after)


def test_filter_gradient_alone_on_an_image_wider_than_a_tile(rng):
    """The last tap's shift (2 rows of 42 + 2) exceeds the tile (1024 / 32 = 32 rows): the zero
    rows past the grid's end must still cover every block."""
    x = rng.standard_normal((1, 40, 40, 32))
    gy = rng.standard_normal((1, 40, 40, 32))
    expected = plain.depthwise_conv2d_backward_filter(x, gy, kernel_size=(3, 3), padding="same")
    assert rel_err(F.depthwise_conv2d_backward_filter(x, gy, kernel_size=(3, 3), padding="same"),
                   expected) < 1e-10
