"""kernels.shapes against Keras' documented output-shape formulas, and its invalid settings.

The expected sizes below are worked out by hand from Keras' documentation:
- Conv2D / pooling: 'valid' -> floor((n - d*(k-1) - 1) / s) + 1, 'same' -> floor((n - 1) / s) + 1;
  for 'same' the total padding max((out-1)*s + d*(k-1) + 1 - n, 0) is split with the odd pixel
  at the bottom/right (TensorFlow).
- Conv2DTranspose (Keras 3, ``compute_conv_transpose_output_shape``): without output_padding
  'valid' -> (n-1)*s + max(k_eff, s), 'same' -> n*s; with output_padding p
  'valid' -> (n-1)*s + k_eff + p, 'same' -> (n-1)*s + k_eff % 2 + p.
"""
import pytest

from kernels import shapes

# (n, kernel, stride, dilation, padding, expected output length)
CONV_CASES = [
    (7, 3, 2, 1, "same", 4),
    (7, 3, 2, 1, "valid", 3),
    (64, 5, 1, 1, "valid", 60),
    (64, 3, 2, 1, "same", 32),
    (5, 3, 1, 2, "valid", 1),
    (10, 3, 1, 3, "same", 10),
    (8, 4, 3, 1, "valid", 2),
    (9, 2, 2, 1, "same", 5),
    (1, 5, 1, 1, "same", 1),
    (1, 1, 3, 1, "valid", 1),
    (6, 2, 1, 2, "valid", 4),
]

# (n, kernel, stride, dilation, padding, output_padding, expected)
TRANSPOSE_CASES = [
    (4, 3, 2, 1, "same", None, 8),       # 'same' s2 -> 2n
    (5, 2, 2, 1, "same", None, 10),      # the U-Net up-sampling
    (4, 3, 2, 1, "valid", None, 9),      # 'valid' k3 s2 -> 2n + 1
    (4, 2, 2, 1, "valid", None, 8),
    (5, 1, 3, 1, "valid", None, 15),     # stride larger than the kernel: (n-1)*s + s
    (3, 5, 1, 1, "same", None, 3),
    (3, 5, 1, 1, "valid", None, 7),
    (4, 3, 2, 2, "valid", None, 11),     # k_eff = 5: 3*2 + 5
    (4, 3, 2, 1, "valid", 1, 10),        # (n-1)*s + k + p
    (4, 3, 2, 1, "same", 1, 8),          # (n-1)*s + k%2 + p
    (4, 3, 2, 1, "same", 0, 7),
    (4, 3, 3, 1, "valid", 2, 14),
    (6, 4, 3, 1, "same", 2, 17),
]

# (n, pool, stride or None, padding, expected)
POOL_CASES = [
    (7, 2, None, "valid", 3),            # strides default to the pool size
    (7, 2, None, "same", 4),
    (7, 3, 2, "same", 4),
    (7, 3, 2, "valid", 3),
    (8, 2, 1, "valid", 7),
    (128, 2, None, "valid", 64),
]


@pytest.mark.parametrize("n, k, s, d, padding, expected", CONV_CASES)
def test_conv_output_length_matches_keras(n, k, s, d, padding, expected):
    assert shapes.conv_output_length(n, k, s, d, padding) == expected
    out_hw, _ = shapes.conv2d_geometry((n, n + 1), (k, 1), (s, 1), (d, 1), padding)
    assert out_hw[0] == expected


@pytest.mark.parametrize("n, k, s, d, padding, output_padding, expected", TRANSPOSE_CASES)
def test_conv_transpose_output_length_matches_keras(n, k, s, d, padding, output_padding, expected):
    assert shapes.conv_transpose_output_length(n, k, s, d, padding, output_padding) == expected
    out_hw, pads = shapes.conv_transpose2d_geometry((n, 2), (k, 1), (s, 1), (d, 1), padding,
                                                    None if output_padding is None
                                                    else (output_padding, 0))
    assert out_hw[0] == expected
    # The forward twin with those paddings maps the transposed output back onto the input.
    (before, after), _ = pads
    assert (expected + before + after - (d * (k - 1) + 1)) // s + 1 == n


@pytest.mark.parametrize("n, pool, stride, padding, expected", POOL_CASES)
def test_pool_output_length_matches_keras(n, pool, stride, padding, expected):
    out_hw, _ = shapes.pool2d_geometry((n, n), pool, stride, padding)
    assert out_hw == (expected, expected)


@pytest.mark.parametrize("n, k, s, expected_pads", [
    (7, 3, 2, (1, 1)),     # total 2
    (6, 3, 2, (0, 1)),     # total 1: the odd pixel goes at the end (TensorFlow, not PyTorch)
    (4, 4, 1, (1, 2)),
    (5, 3, 1, (1, 1)),
    (8, 1, 2, (0, 0)),
])
def test_same_padding_puts_the_extra_pixel_at_the_end(n, k, s, expected_pads):
    _, pads = shapes.conv2d_geometry((n, n), (k, k), (s, s), (1, 1), "same")
    assert pads == (expected_pads, expected_pads)


def test_explicit_padding_forms():
    assert shapes.conv2d_geometry((5, 5), (3, 3), 1, 1, 1) == ((5, 5), ((1, 1), (1, 1)))
    assert shapes.conv2d_geometry((5, 5), (3, 3), 1, 1, (2, 0)) == ((7, 3), ((2, 2), (0, 0)))
    assert shapes.conv2d_geometry((5, 5), (3, 3), 1, 1, ((0, 1), (2, 3))) == \
        ((4, 8), ((0, 1), (2, 3)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(strides=0), "stride"),
    (dict(strides=(1, 0)), "stride"),
    (dict(dilation=0), "dilation"),
    (dict(kernel_hw=(0, 3)), "kernel"),
    (dict(kernel_hw=(6, 1)), "kernel of size 6"),              # larger than a 'valid' input
    (dict(kernel_hw=(3, 3), dilation=(3, 1)), "dilation 3"),    # dilated extent 7 > 5
    (dict(padding="full"), "padding"),
    (dict(padding=-1), "non-negative"),
    (dict(padding=((1, 1),)), "2 entries"),
    (dict(strides=(1, 2, 3)), "strides"),
])
def test_invalid_conv_settings_raise(kwargs, message):
    settings = dict(in_hw=(5, 5), kernel_hw=(3, 3), strides=1, dilation=1, padding="valid")
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        shapes.conv2d_geometry(settings["in_hw"], settings["kernel_hw"], settings["strides"],
                               settings["dilation"], settings["padding"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_padding=2, strides=2), "output_padding"),    # output_padding >= stride
    (dict(output_padding=-1, strides=2), "output_padding"),
    (dict(strides=0), "stride"),
    (dict(dilation=0), "dilation"),
    (dict(padding=(1, 1)), "'valid' or 'same'"),
])
def test_invalid_transpose_settings_raise(kwargs, message):
    settings = dict(strides=1, dilation=1, padding="valid", output_padding=None)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        shapes.conv_transpose2d_geometry((4, 4), (3, 3), settings["strides"],
                                         settings["dilation"], settings["padding"],
                                         settings["output_padding"])


def _keras_jax_left_pad(kernel, stride, dilation, padding, output_padding):
    """Keras 3's padding of the stride-dilated input in its JAX conv_transpose (documented rule)."""
    extent = (kernel - 1) * dilation + 1
    if padding == "valid":
        return extent - 1
    pad_len = stride + extent - 2 if output_padding is None else \
        extent + extent % 2 - 2 + output_padding
    return min(pad_len // 2 + pad_len % 2, extent - 1)


@pytest.mark.parametrize("n", [1, 4, 5])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("op", [None, 0, 1, 2])
def test_transposed_padding_matches_keras(n, kernel, stride, padding, op):
    if op is not None and op >= stride:
        with pytest.raises(ValueError, match="output_padding"):
            shapes.conv_transpose2d_geometry((n, n), kernel, stride, 1, padding, op)
        return
    try:
        _, ((before, _), _) = shapes.conv_transpose2d_geometry((n, n), kernel, stride, 1, padding, op)
    except ValueError:
        return     # settings Keras itself cannot map back (documented as inconsistent)
    # the forward twin's top padding is the kernel extent minus one minus Keras' dilated-input pad
    assert before == kernel - 1 - _keras_jax_left_pad(kernel, stride, 1, padding, op)


def test_geometry_of_a_convolution_window():
    g = shapes.conv_geometry("t", (7, 6), (3, 2), strides=(2, 1), dilation=(1, 2),
                             padding="same")
    assert (g.in_hw, g.kernel_hw, g.strides, g.dilation) == ((7, 6), (3, 2), (2, 1), (1, 2))
    assert g.out_hw == (4, 6) and g.pads == ((1, 1), (1, 1)) and g.padded_hw == (9, 8)
    assert not g.tiles_exactly


@pytest.mark.parametrize("in_hw, pool, strides, padding, tiles", [
    ((4, 6), 2, None, "valid", True), ((4, 6), (2, 3), None, "valid", True),
    ((5, 6), 2, None, "valid", False),           # a row left over
    ((4, 6), 2, 1, "valid", False),              # overlapping windows
    ((3, 3), 2, None, "same", False),            # padded
])
def test_windows_that_tile_the_input_exactly(in_hw, pool, strides, padding, tiles):
    assert shapes.pool_geometry("t", in_hw, pool, strides=strides, padding=padding) \
        .tiles_exactly == tiles


def test_geometry_errors_name_the_function_and_the_shapes():
    with pytest.raises(ValueError, match=r"my_conv: .*empty.*\(input \(4, 4\), kernel \(5, 5\)"):
        shapes.conv_geometry("my_conv", (4, 4), (5, 5))
    with pytest.raises(ValueError, match=r"my_pool: pool_size must be >= 1"):
        shapes.pool_geometry("my_pool", (4, 4), 0)
    with pytest.raises(ValueError, match=r"my_conv: strides must be >= 1"):
        shapes.conv_geometry("my_conv", (4, 4), (3, 3), strides=0)
