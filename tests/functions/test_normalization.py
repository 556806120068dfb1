"""minicnn.functions.normalization: float64 gradient checks of batch normalisation, training and
inference, on every kernel path."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import minicnn as mc
from kernels.backend import to_device
from minicnn.functions.normalization import batch_norm

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
