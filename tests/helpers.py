"""Shared test material (tests/ is on sys.path through pytest's ``pythonpath`` setting)."""
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

import minicnn as mc
from kernels import shapes

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
