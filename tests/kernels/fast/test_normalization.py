"""kernels.fast.normalization held to the plain kernels of kernels.normalization: many blocks,
one thread and several, float64 and float32."""
import numpy as np
import pytest

from kernels import normalization as plain
from kernels.config import settings
from kernels.fast import normalization as F


def _case(rng, dtype):
    """x (3, 5, 4, 3), gamma, beta, an upstream gradient, and the dtype's tolerance."""
    x = (rng.standard_normal((3, 5, 4, 3)) * 2 + 1).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    return x, gamma, beta, dy, tol


def tiny_blocks(x, threads):
    """Settings whose blocks are 3 rows of W*C values: the blocked, threaded path."""
    return settings.override(threads=threads, batchnorm_block_bytes=3 * 4 * 3 * x.itemsize)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocks_on_threads_equal_the_plain_kernels(rng, threads, dtype):
    """Tiny blocks (3 rows of W*C values) force the blocked, threaded path of large activations."""
    x, gamma, beta, dy, tol = _case(rng, dtype)
    whole = plain.batch_norm_forward_training(x, gamma, beta)
    whole_grads = plain.batch_norm_backward(dy, whole[3], whole[4], gamma)
    with tiny_blocks(x, threads):
        assert len(F.blocks(F.rows_of(x)[0])) == 5
        blocked = F.batch_norm_forward_training(x, gamma, beta)
        grads = F.batch_norm_backward(dy, blocked[3], blocked[4], gamma)
        inference = F.batch_norm_forward_inference(x, blocked[1], blocked[2], gamma, beta)
        sums = F.channel_sum(x)
    for a, b in zip(blocked + grads, whole + whole_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **tol)
    np.testing.assert_allclose(inference, plain.batch_norm_forward_inference(
        x, whole[1], whole[2], gamma, beta), **tol)
    np.testing.assert_allclose(sums, plain.channel_sum(x), **tol)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_norm_relu_on_blocks_equals_the_plain_kernels(rng, threads, dtype):
    """The fused forward (ReLU per block) and backward (mask per block), many tiny blocks."""
    x, gamma, beta, dz, tol = _case(rng, dtype)
    whole = plain.batch_norm_relu_forward_training(x, gamma, beta)
    whole_grads = plain.batch_norm_relu_backward(dz, whole[0], whole[3], whole[4], gamma)
    assert 0 < (whole[0] == 0).mean() < 1          # both sides of the kink are exercised
    with tiny_blocks(x, threads):
        assert len(F.blocks(F.rows_of(x)[0])) == 5
        blocked = F.batch_norm_relu_forward_training(x, gamma, beta)
        grads = F.batch_norm_relu_backward(dz, blocked[0], blocked[3], blocked[4], gamma)
    for a, b in zip(blocked + grads, whole + whole_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **tol)
    assert np.array_equal(blocked[0] > 0, whole[0] > 0)


def test_batch_norm_relu_is_relu_of_batch_norm(rng):
    """The plain fused kernels are the composition they name."""
    x, dz = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))
    y, mean, var, centered, inv_std = plain.batch_norm_forward_training(x)
    z = plain.batch_norm_relu_forward_training(x)
    np.testing.assert_array_equal(z[0], np.maximum(y, 0))
    for a, b in zip(z[1:], (mean, var, centered, inv_std)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.batch_norm_relu_backward(dz, z[0], centered, inv_std),
                    plain.batch_norm_backward(dz * (y > 0), centered, inv_std)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(F.batch_norm_relu_backward(dz, z[0], centered, inv_std),
                    plain.batch_norm_relu_backward(dz, z[0], centered, inv_std)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_without_gamma_and_beta(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    for a, b in zip(F.batch_norm_forward_training(x), plain.batch_norm_forward_training(x)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    y, mean, var, centered, inv_std = plain.batch_norm_forward_training(x)
    for a, b in zip(F.batch_norm_backward(dy, centered, inv_std),
                    plain.batch_norm_backward(dy, centered, inv_std)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_the_checks_are_the_plain_kernels():
    with pytest.raises(ValueError, match="batch axis and a channel axis"):
        F.batch_norm_forward_training(np.ones(4))
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        F.batch_norm_forward_inference(np.ones((2, 3)), np.zeros(3), np.ones(3), epsilon=0)
    with pytest.raises(ValueError, match=r"dy of shape \(2, 3\) vs x_centered"):
        F.batch_norm_backward(np.ones((2, 3)), np.ones((2, 4)), np.ones(4))
    for kernels in (F, plain):
        with pytest.raises(ValueError, match=r"batch_norm: epsilon must be > 0"):
            kernels.batch_norm_relu_forward_training(np.ones((2, 3)), epsilon=0)
        with pytest.raises(ValueError, match=r"batch_norm_relu_backward.*\(2, 3\).*\(2, 4\)"):
            kernels.batch_norm_relu_backward(np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 3)),
                                             np.ones(3))
