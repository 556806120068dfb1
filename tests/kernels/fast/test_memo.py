"""kernels.fast.memo and the buffers the tuned convolution shares between calls: taken once,
gone with their array, and the shared results equal the unshared ones."""
import gc

import numpy as np
import pytest

import minicnn as mc
from kernels.config import settings
from kernels.fast import conv2d as F
from kernels.fast import scratch
from kernels.fast.memo import Memo


def test_a_value_is_taken_once_and_only_for_its_own_array():
    memo, a, b = Memo(), np.zeros(3), np.zeros(3)
    memo.put(a, "what", 1)
    assert memo.take(b, "what") is None and memo.take(a, "other") is None
    assert memo.take(a, "what") == 1 and memo.take(a, "what") is None
    memo.put(a, "what", 2)
    memo.forget(a)
    assert memo.take(a, "what") is None


def test_an_entry_goes_with_its_array():
    memo = Memo()
    a = np.zeros(3)
    memo.put(a, "what", np.ones(10))
    assert len(memo) == 1
    del a
    gc.collect()
    assert len(memo) == 0


def test_scratch_stamps_see_a_slot_handed_out_again():
    family = scratch.Scratch("test-stamp")
    try:
        family.get("slot", (4,), np.float64)
        token = family.stamp("slot", np.float64)
        assert scratch.unchanged(token)
        family.get("other", (4,), np.float64)                 # another slot: still unchanged
        assert scratch.unchanged(token)
        family.get("slot", (4,), np.float64)
        assert not scratch.unchanged(token)
        token = family.stamp("slot", np.float64)
        family.release()
        assert not scratch.unchanged(token)
        with settings.override(scratch="fresh"):
            assert family.stamp("slot", np.float64) is None and scratch.unchanged(None)
    finally:
        family.release()


@pytest.mark.parametrize("kernel, padding, algorithm", [
    ((3, 3), "same", "shifted"), ((3, 3), "valid", "shifted"), ((3, 3), "same", "im2col"),
    ((1, 1), "valid", "im2col"), ((2, 2), "valid", "im2col"),
])
def test_shared_buffers_give_the_unshared_results(kernel, padding, algorithm, rng):
    """The forward's workspace, the input gradient's padded dy and the filter gradient's bias
    sums, taken by the next call on the same arrays, give what a cold call gives."""
    x = rng.standard_normal((3, 9, 8, 8))
    w = rng.standard_normal((*kernel, 8, 5))
    args = dict(padding=padding, algorithm=algorithm)
    y = F.conv2d_forward(x, w, **args)
    g = rng.standard_normal(y.shape)
    cold = (F.conv2d_backward_filter(x.copy(), g.copy(), kernel_size=kernel, **args),
            F.bias_gradient(g.copy()))
    keeps = padding == "same" or algorithm == "im2col" and kernel != (1, 1)   # else x itself
    assert (len(F.memo) >= 1) == keeps                        # the forward kept its workspace
    F.conv2d_transpose(g, w, output_size=(9, 8), **args)
    warm = (F.conv2d_backward_filter(x, g, kernel_size=kernel, **args), F.bias_gradient(g))
    for a, b in zip(warm, cold):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    del x, g, y
    gc.collect()
    assert len(F.memo) == 0                                   # taken, or gone with the arrays


def test_no_grad_keeps_nothing(rng):
    x = rng.standard_normal((2, 9, 9, 8))
    w = rng.standard_normal((3, 3, 8, 4))
    F.memo.forget()
    with mc.no_grad():
        assert settings.keep_workspaces is False
        F.conv2d_forward(x, w, padding="same", algorithm="shifted")
        assert len(F.memo) == 0
    assert settings.keep_workspaces is True
    F.conv2d_forward(x, w, padding="same", algorithm="shifted")
    assert len(F.memo) == 1
    F.memo.forget()


def test_a_stale_entry_is_the_callers_to_forget(rng):
    """Writing into x between the forward and the filter gradient: forget(x) first."""
    x = rng.standard_normal((2, 9, 9, 8))
    w = rng.standard_normal((3, 3, 8, 4))
    y = F.conv2d_forward(x, w, padding="same")
    x[...] = rng.standard_normal(x.shape)
    F.memo.forget(x)
    dw = F.conv2d_backward_filter(x, y, kernel_size=(3, 3), padding="same")
    np.testing.assert_allclose(dw, F.conv2d_backward_filter(x.copy(), y, kernel_size=(3, 3),
                                                            padding="same"), rtol=1e-12)
