"""kernels.normalization (the plain kernels): statistics, moving averages (Keras' rule), inference,
gradients. The tuned twins are held to these in tests/kernels/fast/test_normalization.py."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import normalization as BN
from kernels.backend import to_device, to_numpy
from minicnn.gradcheck import numerical_gradient as numerical_grad

FIXTURE_OK = settings(suppress_health_check=list(settings.default.suppress_health_check)
                      + [HealthCheck.function_scoped_fixture])
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}

shapes = st.one_of(
    st.tuples(st.integers(2, 6), st.integers(1, 4)),                                  # (N, C)
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
              st.integers(1, 3))).filter(lambda s: np.prod(s[:-1]) >= 2)


def draw_inputs(seed, shape, dtype):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, c) + rng.uniform(-2, 2, c)).astype(dtype)
    gamma = rng.uniform(0.5, 2, c).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return rng, x, gamma, beta


@FIXTURE_OK
@given(shape=shapes, dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_training_forward_and_backward_equal_reference(device, shape, dtype, seed):
    rng, x, gamma, beta = draw_inputs(seed, shape, dtype)
    d = lambda a: to_device(a, device)   # noqa: E731
    y, mean, var, x_centered, inv_std = BN.batch_norm_forward_training(d(x), d(gamma), d(beta),
                                                                       epsilon=1e-3)
    y_ref, mean_ref, var_ref = BN.batch_norm_training_reference(x, gamma, beta, epsilon=1e-3)
    for got, want in ((y, y_ref), (mean, mean_ref), (var, var_ref)):
        np.testing.assert_allclose(to_numpy(got), want, **TOL[dtype])
        assert got.dtype == dtype
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = BN.batch_norm_backward(d(dy), x_centered, inv_std, d(gamma))
    refs = BN.batch_norm_backward_reference(dy, x, gamma, epsilon=1e-3)
    for got, want in zip((dx, dgamma, dbeta), refs):
        np.testing.assert_allclose(to_numpy(got), want, **TOL[dtype])
        assert got.dtype == dtype


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_training_output_is_standardised_per_channel(shape, seed):
    _, x, gamma, beta = draw_inputs(seed, shape, np.float64)
    axes = tuple(range(len(shape) - 1))
    eps = 1e-3
    y, mean, var, x_centered, inv_std = BN.batch_norm_forward_training(x, gamma, beta,
                                                                       epsilon=eps)
    x_hat = x_centered * inv_std
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=axes), rtol=1e-10)     # biased (ddof=0)
    np.testing.assert_allclose(x_hat.mean(axis=axes), 0, atol=1e-12)
    np.testing.assert_allclose(x_hat.var(axis=axes), var / (var + eps), rtol=1e-10)
    np.testing.assert_allclose(y, gamma * x_hat + beta, rtol=1e-12, atol=1e-12)
    y_no_eps = BN.batch_norm_forward_training(x, epsilon=1e-12)[0]
    np.testing.assert_allclose(y_no_eps.var(axis=axes), var / (var + 1e-12), rtol=1e-9)
    np.testing.assert_allclose(y_no_eps.var(axis=axes)[var > 1e-3], 1, rtol=1e-8)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_training_gradients(shape, seed):
    rng, x, gamma, beta = draw_inputs(seed, shape, np.float64)
    _, _, _, x_centered, inv_std = BN.batch_norm_forward_training(x, gamma, beta)
    projection = rng.standard_normal(shape)
    dx, dgamma, dbeta = BN.batch_norm_backward(projection, x_centered, inv_std, gamma)
    forward = BN.batch_norm_forward_training
    checks = [(dx, lambda v: forward(v, gamma, beta)[0], x),
              (dgamma, lambda v: forward(x, v, beta)[0], gamma),
              (dbeta, lambda v: forward(x, gamma, v)[0], beta)]
    for analytic, f, at in checks:
        np.testing.assert_allclose(analytic, numerical_grad(f, at, projection), rtol=1e-5,
                                   atol=1e-7)


def test_gradient_without_gamma_and_beta(rng):
    x = rng.standard_normal((3, 2, 2, 2))
    _, _, _, x_centered, inv_std = BN.batch_norm_forward_training(x)
    projection = rng.standard_normal(x.shape)
    dx = BN.batch_norm_backward(projection, x_centered, inv_std)[0]
    numeric = numerical_grad(lambda v: BN.batch_norm_forward_training(v)[0], x, projection)
    np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-7)


def test_moving_statistics_follow_keras_closed_form(rng):
    momentum, steps, c = 0.9, 5, 3
    moving_mean, moving_var = np.zeros(c), np.ones(c)
    batches = [rng.standard_normal((4, 3, 3, c)) * (k + 1) + k for k in range(steps)]
    for x in batches:
        _, mean, var, _, _ = BN.batch_norm_forward_training(x)
        moving_mean, moving_var = BN.update_moving_statistics(moving_mean, moving_var, mean, var,
                                                             momentum=momentum)
    # m_k = momentum^k m_0 + (1 - momentum) sum_i momentum^(k-1-i) batch_i, biased variance
    axes = (0, 1, 2)
    want_mean = sum((1 - momentum) * momentum ** (steps - 1 - i) * b.mean(axis=axes)
                    for i, b in enumerate(batches))
    want_var = momentum ** steps * 1.0 + sum(
        (1 - momentum) * momentum ** (steps - 1 - i) * b.var(axis=axes, ddof=0)
        for i, b in enumerate(batches))
    np.testing.assert_allclose(moving_mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(moving_var, want_var, rtol=1e-12)
    unbiased = want_var + sum((1 - momentum) * momentum ** (steps - 1 - i)
                              * (b.var(axis=axes, ddof=1) - b.var(axis=axes))
                              for i, b in enumerate(batches))
    assert not np.allclose(moving_var, unbiased, rtol=1e-6)      # Keras, not PyTorch


@FIXTURE_OK
@given(shape=shapes, dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_inference_uses_moving_statistics(device, shape, dtype, seed):
    rng, x, gamma, beta = draw_inputs(seed, shape, dtype)
    c = shape[-1]
    moving_mean = rng.standard_normal(c).astype(dtype)
    moving_var = rng.uniform(0.5, 2, c).astype(dtype)
    d = lambda a: to_device(a, device)   # noqa: E731
    y = BN.batch_norm_forward_inference(d(x), d(moving_mean), d(moving_var), d(gamma), d(beta),
                                        epsilon=1e-3)
    want = (x.astype(np.float64) - moving_mean) / np.sqrt(moving_var.astype(np.float64) + 1e-3) \
        * gamma + beta
    np.testing.assert_allclose(to_numpy(y), want, **TOL[dtype])
    assert y.dtype == dtype
    dy = rng.standard_normal(shape).astype(dtype)
    dx = BN.batch_norm_backward_inference(d(dy), d(moving_var), d(gamma), epsilon=1e-3)
    np.testing.assert_allclose(to_numpy(dx), dy * gamma / np.sqrt(moving_var + 1e-3), **TOL[dtype])


def test_float32_large_offset_stays_accurate(rng):
    x = (1000 + rng.standard_normal((4, 32, 32, 2))).astype(np.float32)
    y32, mean32, var32, _, _ = BN.batch_norm_forward_training(x)
    y64, mean64, var64, _, _ = BN.batch_norm_forward_training(x.astype(np.float64))
    assert y32.dtype == np.float32 and mean32.dtype == np.float32
    np.testing.assert_allclose(mean32, mean64, rtol=1e-7)
    np.testing.assert_allclose(var32, var64, rtol=1e-3)
    np.testing.assert_allclose(y32, y64, atol=2e-3)


def test_bad_inputs_raise(rng):
    x = rng.standard_normal((2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"gamma of shape \(3,\) does not match the 4 channels"):
        BN.batch_norm_forward_training(x, np.ones(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"beta of shape \(4, 1\)"):
        BN.batch_norm_forward_training(x, np.ones(4), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="batch axis and a channel axis"):
        BN.batch_norm_forward_training(np.ones(4))
    with pytest.raises(TypeError, match="floating point"):
        BN.batch_norm_forward_training(np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        BN.batch_norm_forward_training(x, epsilon=0)
    with pytest.raises(ValueError, match="moving_variance of shape"):
        BN.batch_norm_forward_inference(x, np.zeros(4), np.ones(5))
    with pytest.raises(ValueError, match="momentum must be in"):
        BN.update_moving_statistics(np.zeros(4), np.ones(4), np.zeros(4), np.ones(4), momentum=1.5)
    with pytest.raises(ValueError, match=r"moving_mean of shape \(4,\) vs batch mean"):
        BN.update_moving_statistics(np.zeros(4), np.ones(4), np.zeros(3), np.ones(4))
    _, _, _, x_centered, inv_std = BN.batch_norm_forward_training(x)
    with pytest.raises(ValueError, match=r"dy of shape \(2, 3, 3, 3\) vs x_centered"):
        BN.batch_norm_backward(np.ones((2, 3, 3, 3)), x_centered, inv_std)


def test_inference_gradients_of_the_parameters(rng):
    x = rng.standard_normal((3, 2, 2, 3))
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    projection = rng.standard_normal(x.shape)
    dgamma, dbeta = BN.batch_norm_param_grads_inference(projection, x, mean, var, epsilon=1e-3)
    forward = BN.batch_norm_forward_inference
    np.testing.assert_allclose(dgamma, numerical_grad(
        lambda g: forward(x, mean, var, g, np.zeros(3), epsilon=1e-3), np.ones(3), projection),
        rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, numerical_grad(
        lambda b: forward(x, mean, var, np.ones(3), b, epsilon=1e-3), np.zeros(3), projection),
        rtol=1e-6, atol=1e-8)
