"""minicnn.functions.normalization: float64 gradient checks of batch normalisation, training and
inference, and of batch normalisation then ReLU (one Function), on every kernel path."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minicnn as mc
from kernels import normalization as plain
from kernels.backend import to_device, to_numpy
from minicnn.functions.normalization import BatchNormReLU, batch_norm, batch_norm_relu

from helpers import with_device


@with_device
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
                       st.integers(1, 3)).filter(lambda s: s[0] * s[1] * s[2] >= 2),
       seed=st.integers(0, 2**16))
def test_batch_norm_gradcheck(shape, seed, kernel_path, device):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x, gamma, beta = (to_device(a, device) for a in (
        rng.standard_normal(shape) * 2 + 1, rng.uniform(0.5, 2, c), rng.standard_normal(c)))
    mean, var = (to_device(a, device) for a in (rng.standard_normal(c), rng.uniform(0.5, 2, c)))
    assert mc.gradcheck(lambda t, g, b: batch_norm(t, g, b, training=True), x, gamma, beta,
                        atol=1e-6, rtol=1e-5)
    assert mc.gradcheck(lambda t, g, b: batch_norm(t, g, b, mean, var), x, gamma, beta)


@with_device
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
                       st.integers(1, 3)).filter(lambda s: s[0] * s[1] * s[2] >= 2),
       seed=st.integers(0, 2**16), center=st.booleans())
def test_batch_norm_relu_gradcheck(shape, seed, center, kernel_path, device):
    """BatchNormReLU in float64, batch-norm outputs kept 1e-3 from ReLU's kink; beta = 0 or not
    (with beta 0 about half the outputs are cut)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x, gamma = rng.standard_normal(shape) * 2 + 1, rng.uniform(0.5, 2, c)
    beta = rng.standard_normal(c) if center else np.zeros(c)
    y = plain.batch_norm_forward_training(x, gamma, beta)[0]
    assume(np.abs(y).min() > 1e-3)
    x, gamma, beta = (to_device(a, device) for a in (x, gamma, beta))
    out = batch_norm_relu(mc.Tensor(x, requires_grad=True), gamma, beta)
    assert type(out.creator).__name__ == "BatchNormReLU"
    np.testing.assert_allclose(to_numpy(out.data), np.maximum(y, 0), rtol=1e-12, atol=1e-12)
    assert mc.gradcheck(lambda t, g, b: batch_norm_relu(t, g, b), x, gamma, beta,
                        atol=1e-6, rtol=1e-5)


def test_batch_norm_relu_gradcheck_can_fail(rng):
    """A wrong backward (the ReLU's mask left out) is caught by the same check."""
    x, gamma, beta = rng.standard_normal((2, 3, 3, 2)), rng.uniform(0.5, 2, 2), np.zeros(2)

    class Unmasked(BatchNormReLU):
        def backward(self, g):
            dx, dgamma, dbeta = plain.batch_norm_backward(g, self.x_centered, self.inv_std,
                                                          self.gamma)
            return dx, dgamma, dbeta
    with pytest.raises(mc.GradcheckError):
        mc.gradcheck(lambda t, g, b: Unmasked()(t, g, b), x, gamma, beta, atol=1e-6, rtol=1e-5)
