"""Autograd core: every Tensor operation against float64 central differences."""

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import minicnn as mc
from minicnn.functions import math as fm

finite = st.floats(-2, 2, allow_nan=False, width=64)
positive = st.floats(0.5, 3, allow_nan=False, width=64)


def broadcastable_pair(elements=finite):
    """Two float64 arrays whose shapes broadcast against each other."""
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3).flatmap(
        lambda s: st.tuples(hnp.arrays(np.float64, s.input_shapes[0], elements=elements),
                            hnp.arrays(np.float64, s.input_shapes[1], elements=elements)))


@given(broadcastable_pair())
def test_add_sub_mul_broadcast_gradients(pair):
    a, b = pair
    assert mc.gradcheck(lambda x, y: x + y * x - y, a, b)


@given(broadcastable_pair(elements=positive))
def test_div_and_power_gradients(pair):
    a, b = pair
    assert mc.gradcheck(lambda x, y: x / y + x ** 3 - y ** 0.5 + x ** y, a, b)


@given(hnp.arrays(np.float64, hnp.array_shapes(max_dims=3, max_side=4), elements=positive))
def test_unary_gradients(x):
    assert mc.gradcheck(lambda t: t.exp() + t.log() * t.sqrt() - (-t), x)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.data())
def test_matmul_gradients(n, k, m, batch, data):
    shape_a = (2,) * batch + (n, k)
    a = data.draw(hnp.arrays(np.float64, shape_a, elements=finite))
    b = data.draw(hnp.arrays(np.float64, (k, m), elements=finite))
    assert mc.gradcheck(lambda x, y: x @ y, a, b)


def test_matmul_vector_cases(rng):
    assert mc.gradcheck(lambda x, y: x @ y, rng.normal(size=3), rng.normal(size=(3, 2)))
    assert mc.gradcheck(lambda x, y: x @ y, rng.normal(size=(2, 3)), rng.normal(size=3))


@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), elements=finite),
       st.data())
def test_reductions_over_axes(x, data):
    axis = data.draw(st.none() | st.integers(0, x.ndim - 1) | st.just(tuple(range(x.ndim))[-2:]))
    keepdims = data.draw(st.booleans())
    assert mc.gradcheck(lambda t: t.sum(axis, keepdims) * 2 + t.mean(axis, keepdims), x)


@given(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), st.data())
def test_max_gradient_without_ties(shape, data):
    order = data.draw(st.permutations(range(int(np.prod(shape)))))
    x = np.array(order, dtype=np.float64).reshape(shape) * 0.1   # distinct, 0.1 apart
    axis = data.draw(st.none() | st.integers(0, x.ndim - 1))
    keepdims = data.draw(st.booleans())
    assert mc.gradcheck(lambda t: t.max(axis, keepdims), x)


def test_max_splits_gradient_between_ties():
    x = mc.Tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    x.max().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.5, 0.5])


@given(hnp.arrays(np.float64, (2, 3, 4), elements=finite))
def test_shape_functions(x):
    assert mc.gradcheck(lambda t: t.reshape(4, 6).T.reshape((3, 8)) * 1.5, x)
    assert mc.gradcheck(lambda t: t.transpose(2, 0, 1)[1:, ::2, -1], x)
    assert mc.gradcheck(lambda t: fm.pad(t, ((0, 1), (2, 0), (1, 1))) ** 2, x)


def test_advanced_indexing_adds_repeated_positions(rng):
    x = rng.normal(size=(4, 3))
    assert mc.gradcheck(lambda t: t[np.array([0, 2, 0, 3])], x)
    t = mc.Tensor(x, requires_grad=True)
    t[np.array([1, 1, 1])].sum().backward()
    np.testing.assert_array_equal(t.grad[1], [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(t.grad[0], [0.0, 0.0, 0.0])


@given(st.integers(0, 2), st.lists(st.integers(1, 3), min_size=1, max_size=3), st.data())
def test_concatenate_and_stack(axis, sizes, data):
    parts = []
    for n in sizes:
        shape = [2, 3, 2]
        shape[axis] = n
        parts.append(data.draw(hnp.arrays(np.float64, tuple(shape), elements=finite)))
    assert mc.gradcheck(lambda *ts: fm.concatenate(ts, axis=axis) * 3, *parts)
    same = [parts[0]] * 2
    assert mc.gradcheck(lambda *ts: fm.stack(ts, axis=axis) ** 2, *same)


@pytest.mark.parametrize("threads", [2, 3])
def test_large_concatenate_copies_in_image_groups(threads):
    """Large NumPy joins copy their images on the kernel threads (forced here on small ones):
    the values, the promoted dtype and every axis as np.concatenate."""
    rng = np.random.default_rng(0)
    with mc.config.override(parallel_min_bytes=0, threads=threads):
        for axis in (-1, 1, 2, 0):
            a = rng.standard_normal((5, 4, 3, 2))
            b = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
            joined = fm.concatenate([mc.Tensor(a), mc.Tensor(b)], axis=axis).data
            expected = np.concatenate([a, b], axis=axis)
            assert joined.dtype == expected.dtype
            np.testing.assert_array_equal(joined, expected)


def test_concatenate_rejects_mismatch():
    a, b = mc.Tensor(np.zeros((2, 4, 4, 3))), mc.Tensor(np.zeros((2, 5, 4, 3)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\).*\(2, 5, 4, 3\)"):
        fm.concatenate([a, b], axis=-1)


def test_incompatible_shapes_raise_naming_operation_and_shapes():
    a, b = mc.Tensor(np.zeros((2, 3))), mc.Tensor(np.zeros((4,)))
    with pytest.raises(ValueError, match=r"Add: shapes \(2, 3\) and \(4,\)"):
        a + b
    with pytest.raises(ValueError, match=r"MatMul: shapes \(2, 3\) and \(2, 3\)"):
        a @ a


def test_tensor_used_twice_accumulates():
    x = mc.Tensor(np.array([2.0, -1.0]), requires_grad=True)
    y = x * x + x           # dy/dx = 2x + 1
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, -1.0])
    (x * 3).sum().backward()   # a second graph adds to .grad
    np.testing.assert_array_equal(x.grad, [8.0, 2.0])


def test_deep_chain_does_not_recurse():
    x = mc.Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 10_000])


def test_diamond_graph_order():
    x = mc.Tensor(np.array(3.0), requires_grad=True)
    a = x * 2
    b = a * a          # b depends on a; c on both
    c = a + b
    c.backward()       # dc/dx = 2 + 2a * 2 = 2 + 24
    assert x.grad == pytest.approx(26.0)


def test_graph_is_freed_unless_retained():
    x = mc.Tensor(np.ones(3), requires_grad=True)
    y = (x * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()
    z = (x * 2).sum()
    z.backward(retain_graph=True)
    z.backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0, 6.0])


def test_intermediate_activation_is_released():
    import gc
    import weakref
    x = mc.Tensor(np.ones(4), requires_grad=True)
    h = x + 1
    ref = weakref.ref(h)
    y = (h * 3).sum()        # Mul saves its inputs; Add saves only shapes
    del h
    gc.collect()
    assert ref() is None     # the graph holds nodes, not the tensor
    y.backward()
    np.testing.assert_array_equal(x.grad, [3.0] * 4)


def test_no_grad_builds_no_graph():
    x = mc.Tensor(np.ones(3), requires_grad=True)
    with mc.no_grad():
        y = x * 2
    assert not y.requires_grad and y.creator is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_detach_cuts_the_graph():
    x = mc.Tensor(np.array([2.0]), requires_grad=True)
    y = x * x.detach()       # d/dx treats the detached factor as a constant
    y.backward()
    np.testing.assert_array_equal(x.grad, [2.0])


def test_scalar_operands_keep_float32():
    x = mc.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = 2 * x / 3 + 1 - x ** 2
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_retain_grad_on_intermediate():
    x = mc.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = (x * 3).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_array_equal(h.grad, 2 * h.data)


def test_backward_needs_gradient_for_non_scalar():
    x = mc.Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(ValueError, match="one-element"):
        (x * 2).backward()


def test_custom_function_shape_error():
    class Wrong(mc.Function):
        def forward(self, x):
            return x.sum()

        def backward(self, g):
            return (g,)   # wrong: should have x's shape

    x = mc.Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match="Wrong.backward returned a gradient of shape"):
        Wrong()(x).backward()
