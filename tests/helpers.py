"""Shared test material (tests/ is on sys.path through pytest's ``pythonpath`` setting)."""
import numpy as np
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

import minicnn as mc
from kernels import shapes
from kernels.backend import to_numpy
from minicnn.gradcheck import numerical_gradient

# Hypothesis with the function-scoped ``device`` fixture (the same inputs on CPU and GPU).
with_device = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                              HealthCheck.too_slow, HealthCheck.data_too_large])

paddings = st.one_of(
    st.sampled_from(["valid", "same"]),
    st.integers(0, 2),
    st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
              st.tuples(st.integers(0, 2), st.integers(0, 2))),
)


@st.composite
def window_settings(draw, max_size=9, **extra):
    """A valid sliding window: batch, odd/even/size-1 images, channels, kernel 1..5 (non-square),
    stride and dilation 1..3, padding; ``extra`` names more drawn entries (e.g. o=, m=)."""
    s = dict(
        n=draw(st.integers(1, 2)), h=draw(st.integers(1, max_size)),
        w=draw(st.integers(1, max_size)), c=draw(st.integers(1, 4)),
        kernel=(draw(st.integers(1, 5)), draw(st.integers(1, 5))),
        strides=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        dilation=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        padding=draw(paddings),
        **{name: draw(strategy) for name, strategy in extra.items()},
    )
    try:
        shapes.conv2d_geometry((s["h"], s["w"]), s["kernel"], s["strides"], s["dilation"],
                               s["padding"])
    except ValueError:
        assume(False)
    return s


class Cube(mc.Function):
    """y = x^3 with a chosen (possibly wrong) derivative factor: gradcheck's test subject."""

    def __init__(self, factor=3.0):
        self.factor = factor

    def forward(self, x):
        self.x = x
        return x ** 3

    def backward(self, g):
        return g * self.factor * self.x ** 2


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (host copies; shapes must agree)."""
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


def numerical_gradients(f, arrays, seed=7):
    """Central differences of L = sum(f(*arrays) * r), r a fixed random projection (float64):
    ``(r, [dL/d array for each array])``."""
    r = np.random.default_rng(seed).standard_normal(np.shape(f(*arrays)))
    grads = []
    for k in range(len(arrays)):
        def of_one(v, k=k):
            return f(*arrays[:k], v, *arrays[k + 1:])
        grads.append(numerical_gradient(of_one, arrays[k].copy(), projection=r))
    return r, grads


@st.composite
def pool_settings(draw, max_pool=3):
    """(x_shape, pool_size, strides, padding) that give a non-empty output."""
    pool = (draw(st.integers(1, max_pool)), draw(st.integers(1, max_pool)))
    strides = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.sampled_from(["valid", "same"]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h = draw(st.integers(pool[0] if padding == "valid" else 1, 7))
    w = draw(st.integers(pool[1] if padding == "valid" else 1, 7))
    return (n, h, w, c), pool, strides, padding


def check_kernel_gradient(forward, backward, x, seed=0, atol=1e-7, rtol=1e-5):
    """backward(r, saved) against d/dx sum(forward(x)[0] * r) for a fixed random r (the
    ``(values, saved)`` kernels of kernels.losses, kernels.dice, kernels.reduction)."""
    values, saved = forward(x.copy())
    r = np.random.default_rng(seed).standard_normal(np.shape(values))
    analytic = backward(np.asarray(r), saved)
    numeric = numerical_gradient(lambda z: float(np.sum(forward(z)[0] * r)), x.copy())
    np.testing.assert_allclose(analytic, numeric, atol=atol, rtol=rtol)


def one_hot_np(labels, n_classes):
    return np.eye(n_classes)[labels]
