"""minicnn.functions.activations: float64 gradient checks of every activation on every kernel
path, and the calling convention."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis.extra import numpy as hnp

import minicnn as mc
from kernels.backend import to_device
from minicnn.functions import activations as A

from helpers import with_device

AWAY_FROM_KINKS = hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, max_side=4),
                             elements=dict(min_value=0.05, max_value=3.0)).map(
    lambda a: a * np.where(np.arange(a.size).reshape(a.shape) % 2, -1, 1))


@with_device
@given(x=AWAY_FROM_KINKS)
def test_activations_gradcheck(x, kernel_path, device):
    x = to_device(x, device)
    for fn in (A.relu, A.sigmoid, A.tanh, lambda t: A.leaky_relu(t, negative_slope=0.2),
               lambda t: A.relu(t, negative_slope=0.1, max_value=2.5, threshold=0.01),
               lambda t: A.softmax(t, axis=0), A.log_softmax,
               lambda t: A.dropout(t, rate=0.4, seed=3)):
        assert mc.gradcheck(fn, x)


def test_settings_are_keyword_only():
    x = np.ones((2, 3))
    for call in (lambda: A.softmax(x, 0), lambda: A.leaky_relu(x, 0.2),
                 lambda: A.dropout(x, 0.5)):
        with pytest.raises(TypeError):
            call()
