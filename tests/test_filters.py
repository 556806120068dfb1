"""minicnn.filters: each classic kernel through conv2d against scipy.ndimage.correlate, and the
properties the course states (blurs keep the mean, edge detectors kill flat regions)."""
import numpy as np
import pytest
import scipy.ndimage

from kernels import conv2d as K
from kernels.backend import to_device, to_numpy
from minicnn import filters

NAMES = sorted(filters.FILTERS)


@pytest.mark.parametrize("name", NAMES)
def test_filter_through_conv2d_matches_scipy_on_interior(name, rng):
    image = rng.random((13, 11))
    f = filters.get(name)
    kernel = filters.as_conv_kernel(name, channels=1, dtype="float64")
    ours = K.conv2d_forward(image[None, :, :, None], kernel, padding="valid")[0, :, :, 0]
    full = scipy.ndimage.correlate(image, f, mode="reflect")      # borders differ, interior not
    a, b = f.shape[0] // 2, f.shape[1] // 2
    np.testing.assert_allclose(ours, full[a:a + ours.shape[0], b:b + ours.shape[1]],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_apply_filter_same_padding_is_zero_padded_correlate(name, rng, device):
    image = rng.random((3, 9, 8, 2)).astype(np.float32)
    got = to_numpy(filters.apply_filter(to_device(image, device), name))
    assert got.shape == image.shape and got.dtype == np.float32
    f = filters.get(name)
    for n in range(3):
        for c in range(2):
            expected = scipy.ndimage.correlate(image[n, :, :, c].astype(np.float64), f,
                                               mode="constant")
            np.testing.assert_allclose(got[n, :, :, c], expected, rtol=1e-5, atol=1e-5)


def test_apply_filter_layouts(rng):
    gray = rng.random((6, 7))
    assert filters.apply_filter(gray, "box_blur").shape == (6, 7)
    color = (rng.random((6, 7, 3)) * 255).astype(np.uint8)
    out = filters.apply_filter(color, "sharpen")
    assert out.shape == (6, 7, 3) and out.dtype == np.float32
    np.testing.assert_allclose(filters.apply_filter(gray, "identity"), gray)


def test_multichannel_conv_kernel_filters_each_channel_alone(rng):
    image = rng.random((1, 8, 8, 3))
    kernel = filters.as_conv_kernel("edge_detect_3", channels=3, dtype="float64")
    assert kernel.shape == (3, 3, 3, 3)
    out = K.conv2d_forward(image, kernel, padding="same")
    for c in range(3):
        np.testing.assert_allclose(out[0, :, :, c], scipy.ndimage.correlate(
            image[0, :, :, c], filters.EDGE_DETECT_3, mode="constant"), atol=1e-12)


@pytest.mark.parametrize("name, total", [
    ("identity", 1), ("sharpen", 1), ("box_blur", 1), ("gaussian_blur_3", 1),
    ("gaussian_blur_5", 1), ("edge_detect_1", 0), ("edge_detect_2", 0), ("edge_detect_3", 0),
])
def test_weights_sum_and_flat_regions(name, total):
    """Blurs, sharpen and identity keep a flat region's value; edge detectors send it to 0."""
    f = filters.get(name)
    assert np.isclose(f.sum(), total)
    flat = np.full((1, 9, 9, 1), 0.7)
    out = K.conv2d_forward(flat, filters.as_conv_kernel(name, dtype="float64"))
    np.testing.assert_allclose(out, 0.7 * total, atol=1e-12)


def test_gaussians_are_separable_and_symmetric():
    for name, size in (("gaussian_blur_3", 3), ("gaussian_blur_5", 5)):
        f = filters.get(name)
        assert f.shape == (size, size)
        assert np.linalg.matrix_rank(f) == 1                 # an outer product of two 1-D blurs
        np.testing.assert_array_equal(f, f.T)
        np.testing.assert_array_equal(f, f[::-1, ::-1])
        assert f[size // 2, size // 2] == f.max()


def test_blur_lowers_noise_and_edges_find_a_step(rng):
    noise = rng.standard_normal((32, 32))
    assert filters.apply_filter(noise, "gaussian_blur_5", "valid").std() < 0.5 * noise.std()
    step = np.zeros((8, 8))
    step[:, 4:] = 1.0                                        # a vertical edge between cols 3 and 4
    response = np.abs(filters.apply_filter(step, "edge_detect_2", "valid"))
    assert set(np.nonzero(response.sum(axis=0))[0]) == {2, 3}   # columns 3 and 4 of the image


def test_kernel_shapes_and_dtypes():
    assert filters.as_depthwise_kernel("sharpen", channels=4).shape == (3, 3, 4, 1)
    assert filters.as_conv_kernel("gaussian_blur_5").shape == (5, 5, 1, 1)
    assert filters.as_conv_kernel("box_blur").dtype == np.float32
    custom = filters.as_conv_kernel([[1.0, 2.0]], channels=2)
    assert custom.shape == (1, 2, 2, 2) and custom[0, 1, 1, 1] == 2 and custom[0, 1, 0, 1] == 0


def test_bad_filters_raise():
    with pytest.raises(ValueError, match=r"unknown filter 'blur'.*box_blur"):
        filters.get("blur")
    with pytest.raises(ValueError, match=r"2-D array.*\(3,\)"):
        filters.get([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"apply_filter: image must be.*\(2, 2, 2, 2, 2\)"):
        filters.apply_filter(np.zeros((2, 2, 2, 2, 2)), "identity")
