"""kernels.fast.arrays: a large join copies its images on the threads, like np.concatenate."""
import numpy as np
import pytest

from kernels import arrays as plain
from kernels.config import settings
from kernels.fast import arrays as F


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_concatenate_in_image_groups_equals_the_plain_kernel(threads, rng):
    a = rng.standard_normal((5, 4, 3, 2))
    b = rng.standard_normal((5, 4, 3, 1)).astype(np.float32)
    c = rng.standard_normal((5, 4, 3, 2))
    with settings.override(parallel_min_bytes=0, threads=threads):
        for axis in (-1, 3, 0):
            parts = (a, b) if axis in (-1, 3) else (a, c)
            joined = F.concatenate(*parts, axis=axis)
            expected = plain.concatenate(*parts, axis=axis)
            assert joined.dtype == expected.dtype
            np.testing.assert_array_equal(joined, expected)
        for axis in (1, 2):
            np.testing.assert_array_equal(F.concatenate(a, c, axis=axis),
                                          np.concatenate([a, c], axis=axis))
