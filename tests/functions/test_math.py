"""minicnn.functions.math's concatenation on every kernel path (the tuned twin copies large
batches on the threads): values, promoted dtype, gradients."""
import numpy as np

import minicnn as mc
from minicnn.functions import math as fm


def test_concatenate_on_every_path(kernel_path, rng):
    a = rng.standard_normal((3, 4, 2, 2))
    b = rng.standard_normal((3, 4, 2, 1))
    with mc.config.override(parallel_min_bytes=0, threads=2):
        for axis in (-1, 1, 0):
            other = b if axis == -1 else a
            joined = fm.concatenate([mc.Tensor(a), mc.Tensor(other.astype(np.float32))],
                                    axis=axis).data
            expected = np.concatenate([a, other.astype(np.float32)], axis=axis)
            assert joined.dtype == expected.dtype
            np.testing.assert_array_equal(joined, expected)
        assert mc.gradcheck(lambda s, t: fm.concatenate([s, t], axis=-1) * 2, a, b)
