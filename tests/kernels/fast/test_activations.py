"""kernels.fast.activations (ReLU in blocks on the threads) held to the plain kernels."""
import numpy as np
import pytest

from kernels import activations as plain
from kernels.config import settings
from kernels.fast import activations as F


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_relu_in_blocks_on_threads_equals_the_plain_kernel(threads):
    """Tiny blocks force the blocked path (several blocks per thread, a ragged last block, a
    non-contiguous input)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 7, 5, 4))[:, ::2]                # (3, 4, 5, 4), not contiguous
    x[0, 0, 0] = 0.0
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with settings.override(elementwise_block_bytes=40, threads=threads):
        y = F.relu_forward(x)
        dx = F.relu_backward(dy, y.astype(np.float32))
    assert y.flags.c_contiguous and dx.dtype == np.float32
    np.testing.assert_array_equal(y, plain.relu_forward(x))
    np.testing.assert_array_equal(dx, plain.relu_backward(dy, y.astype(np.float32)))
    with pytest.raises(ValueError, match=r"relu_backward: gradient shape \(2,\) differs"):
        F.relu_backward(np.ones(2), np.ones(3))
