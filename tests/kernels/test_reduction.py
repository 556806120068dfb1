"""kernels.reduction: Keras 3's weighted reduction of per-sample losses against its loops, its
gradient against central differences, the ignore mask and per-sample weights."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kernels import reduction as R

from helpers import check_kernel_gradient

@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
       reduction=st.sampled_from(R.REDUCTIONS), weighted=st.booleans(), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_weighted_reduction_matches_reference_and_gradient(shape, reduction, weighted, masked, seed):
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 2, shape)
    w = rng.uniform(0, 2, shape) if weighted else None
    mask = rng.uniform(size=shape) > 0.3 if masked else None
    out, saved = R.weighted_reduction_forward(values, w, mask, reduction=reduction)
    expected = R.weighted_reduction_reference(values, w, mask, reduction=reduction)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)
    check_kernel_gradient(lambda v: R.weighted_reduction_forward(v, w, mask, reduction=reduction),
                          R.weighted_reduction_backward, values, seed)


def test_reduction_with_ignore_mask_averages_over_valid_entries_only():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    mask = np.array([True, False, True, False])
    out, _ = R.weighted_reduction_forward(values, None, mask, reduction="sum_over_batch_size")
    assert float(out) == pytest.approx(2.0)          # (1 + 3) / 2
    out, _ = R.weighted_reduction_forward(values, np.array([1.0, 1, 3, 1]), mask,
                                          reduction="sum_over_batch_size")
    assert float(out) == pytest.approx(5.0)          # (1 + 9) / 2: the weights do not divide
    out, _ = R.weighted_reduction_forward(values, None, np.zeros(4, bool),
                                          reduction="sum_over_batch_size")
    assert float(out) == 0.0                         # no valid entry: 0, not NaN
    out, _ = R.weighted_reduction_forward(values, None, mask, reduction="none")
    np.testing.assert_array_equal(out, [1.0, 0.0, 3.0, 0.0])


def test_reduction_aligns_per_sample_weights_with_the_batch_axis():
    values = np.arange(12.0).reshape(2, 3, 2)
    out, _ = R.weighted_reduction_forward(values, np.array([1.0, 0.0]), reduction="sum")
    assert float(out) == values[0].sum()
    with pytest.raises(ValueError, match=r"sample_weight of shape \(3, 3\)"):
        R.weighted_reduction_forward(values, np.ones((3, 3)), reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        R.weighted_reduction_forward(values, reduction="average")
