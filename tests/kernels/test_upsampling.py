"""kernels.upsampling: the kernels against their loops, gradients against central differences,
hand-computed values (Keras' nearest and half-pixel bilinear), and bad inputs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import upsampling as U
from kernels.backend import to_device, to_numpy
from minicnn.gradcheck import numerical_gradient as numerical_grad

FIXTURE_OK = settings(suppress_health_check=list(settings.default.suppress_health_check)
                      + [HealthCheck.function_scoped_fixture])
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}

upsample_settings = dict(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
    size=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    interpolation=st.sampled_from(["nearest", "bilinear"]))


@FIXTURE_OK
@given(**upsample_settings, dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_upsample_equals_reference(device, shape, size, interpolation, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    y = U.upsample2d_forward(to_device(x, device), size=size, interpolation=interpolation)
    assert y.shape == (shape[0], shape[1] * size[0], shape[2] * size[1], shape[3])
    assert y.dtype == dtype
    np.testing.assert_allclose(to_numpy(y),
                               U.upsample2d_reference(x, size=size, interpolation=interpolation),
                               **TOL[dtype])
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = U.upsample2d_backward(to_device(dy, device), size=size, interpolation=interpolation)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(to_numpy(dx),
                               U.upsample2d_backward_reference(dy, size=size,
                                                               interpolation=interpolation),
                               **TOL[dtype])


@given(**upsample_settings, seed=st.integers(0, 2**16))
def test_upsample_gradient(shape, size, interpolation, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    projection = rng.standard_normal(U.upsample2d_forward(x, size=size,
                                                          interpolation=interpolation).shape)
    numeric = numerical_grad(lambda v: U.upsample2d_forward(v, size=size,
                                                            interpolation=interpolation),
                             x, projection)
    analytic = U.upsample2d_backward(projection, size=size, interpolation=interpolation)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_upsample_nearest_repeats_rows_and_columns():
    x = np.arange(12).reshape(2, 2, 1, 3).astype(np.float32)     # Keras' docstring example
    y = U.upsample2d_forward(x, size=(1, 2))
    np.testing.assert_array_equal(y, np.repeat(x, 2, axis=2))
    np.testing.assert_array_equal(U.upsample2d_forward(x, size=2),
                                  np.repeat(np.repeat(x, 2, 1), 2, 2))


def test_upsample_bilinear_half_pixel_centres_clamped_edges():
    # output o samples (o + 0.5) / 2 - 0.5: -0.25, 0.25, 0.75, ... , 3.25, clamped to [0, 3]
    x = np.array([0.0, 1.0, 2.0, 4.0]).reshape(1, 1, 4, 1)
    y = U.upsample2d_forward(x, size=(1, 2), interpolation="bilinear")
    np.testing.assert_allclose(y.ravel(), [0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 4])
    # factor 3: offsets -1/3, 0, +1/3
    y = U.upsample2d_forward(x.reshape(1, 4, 1, 1), size=(3, 1), interpolation="bilinear")
    np.testing.assert_allclose(y.ravel(), [0, 0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 8 / 3,
                                           10 / 3, 4, 4])
    # separable: a 2-D ramp stays the product of 1-D interpolations
    img = np.outer([0.0, 1.0], [0.0, 2.0]).reshape(1, 2, 2, 1)
    y = U.upsample2d_forward(img, size=2, interpolation="bilinear")[0, :, :, 0]
    rows = np.array([0, 0.25, 0.75, 1])
    np.testing.assert_allclose(y, np.outer(rows, 2 * rows))


def test_bad_inputs_raise():
    x = np.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        U.upsample2d_forward(x, size=2, interpolation="bicubic")
    with pytest.raises(ValueError, match="size must be >= 1"):
        U.upsample2d_forward(x, size=(0, 2))
    with pytest.raises(ValueError, match=r"not a multiple of size \(2, 2\)"):
        U.upsample2d_backward(np.zeros((1, 5, 4, 2)), size=2)
    with pytest.raises(ValueError, match=r"upsample2d: x must be 4-D"):
        U.upsample2d_forward(np.zeros((4, 4, 2)))
