"""Initializers: Keras' fans, variances, bounds, truncation, lookup by name, determinism."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minicnn
from minicnn import initializers

# Standard deviation of a unit normal cut at +-2, from scipy (independent of the module's constant).
scipy_stats = pytest.importorskip("scipy.stats")
TRUNC_STD = float(scipy_stats.truncnorm(-2.0, 2.0).std())


def fans_by_definition(shape):
    """fan_in, fan_out written out: product of the leading (spatial) dims times in / out."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = 1
    for d in shape[:-2]:
        receptive *= d
    return shape[-2] * receptive, shape[-1] * receptive


def test_truncated_normal_constant_is_the_std_of_a_unit_normal_cut_at_two():
    assert initializers.TRUNCATED_NORMAL_STD == pytest.approx(TRUNC_STD, rel=1e-12)


@pytest.mark.parametrize("shape, fans", [
    ((), (1, 1)),
    ((7,), (7, 7)),
    ((3, 5), (3, 5)),                    # dense (in, out)
    ((3, 3, 4, 8), (36, 72)),            # conv HWIO: 3*3*4, 3*3*8
    ((5, 5, 1, 1), (25, 25)),
    ((3, 3, 16, 2), (144, 18)),          # depthwise (kh, kw, in, multiplier): generic rule
    ((2, 3, 4, 5, 6), (120, 144)),       # conv3d
])
def test_compute_fans_known_shapes(shape, fans):
    assert initializers.compute_fans(shape) == fans


@given(st.lists(st.integers(1, 6), min_size=0, max_size=5))
def test_compute_fans_any_rank(shape):
    assert initializers.compute_fans(tuple(shape)) == fans_by_definition(tuple(shape))


# name, variance(fan_in, fan_out), distribution, extra
SCALED = [
    ("glorot_uniform", lambda fi, fo: 2.0 / (fi + fo), "uniform"),
    ("glorot_normal", lambda fi, fo: 2.0 / (fi + fo), "truncated"),
    ("he_normal", lambda fi, fo: 2.0 / fi, "truncated"),
    ("he_uniform", lambda fi, fo: 2.0 / fi, "uniform"),
    ("lecun_normal", lambda fi, fo: 1.0 / fi, "truncated"),
    ("lecun_uniform", lambda fi, fo: 1.0 / fi, "uniform"),
]


def assert_moments(x, variance, kurtosis_bound=3.0):
    """Mean 0 and E[x^2] == variance, within 5 standard errors of the estimates."""
    x = x.astype(np.float64).ravel()
    n = x.size
    assert abs(x.mean()) < 5 * math.sqrt(variance / n)
    second = np.mean(x * x)
    tolerance = 5 * variance * math.sqrt((kurtosis_bound - 1) / n)
    assert abs(second - variance) < tolerance, (second, variance, tolerance)


@pytest.mark.parametrize("name, variance, kind", SCALED)
@pytest.mark.parametrize("shape", [(3, 3, 32, 96), (600, 80)])
def test_variance_scaling_statistics(name, variance, kind, shape):
    minicnn.seed(11)
    x = initializers.get(name)(shape)
    assert x.shape == shape and x.dtype == np.float32
    fan_in, fan_out = fans_by_definition(shape)
    s = variance(fan_in, fan_out)
    assert_moments(x, s)
    if kind == "uniform":
        limit = math.sqrt(3 * s)
        assert np.abs(x).max() <= limit
        assert np.abs(x).max() > limit * (1 - 20.0 / x.size)
    else:
        sigma = math.sqrt(s) / TRUNC_STD          # the normal before truncation
        assert np.abs(x).max() <= 2 * sigma * (1 + 1e-6)
        assert np.abs(x).max() > 1.95 * sigma      # truncated at 2 sigma, not narrower
        # an untruncated N(0, sqrt(s)) would put 4.6% of the values beyond 2 sigma
        assert np.mean(np.abs(x) > 2 * math.sqrt(s)) > 0.02


def test_plain_random_initializers_use_keras_defaults():
    minicnn.seed(5)
    shape = (200, 300)
    assert_moments(initializers.get("random_normal")(shape), 0.05 ** 2)
    u = initializers.get("random_uniform")(shape)
    assert u.min() >= -0.05 and u.max() <= 0.05
    assert_moments(u, 0.05 ** 2 / 3)
    t = initializers.get("truncated_normal")(shape)
    assert np.abs(t).max() <= 0.1 * (1 + 1e-6)
    assert_moments(t, (0.05 * TRUNC_STD) ** 2)


def test_random_initializers_take_arguments():
    minicnn.seed(5)
    x = initializers.RandomNormal(mean=3.0, stddev=0.5)((100, 100), dtype="float64")
    assert x.dtype == np.float64
    assert abs(x.mean() - 3.0) < 5 * 0.5 / 100
    assert_moments(x - 3.0, 0.25)
    u = initializers.RandomUniform(minval=1.0, maxval=2.0)((50, 50))
    assert u.min() >= 1.0 and u.max() <= 2.0
    vs = initializers.VarianceScaling(scale=0.5, mode="fan_out", distribution="untruncated_normal")
    v = vs((40, 500))
    assert_moments(v, 0.5 / 500)


def test_variance_uses_at_least_one_unit():
    # Keras divides by max(1, n): a zero fan must not divide by zero
    x = initializers.get("he_normal")((0, 4))
    assert x.shape == (0, 4)


@pytest.mark.parametrize("name", ["glorot_uniform", "he_normal", "random_normal", "orthogonal"])
def test_seed_makes_draws_repeat(name):
    init = initializers.get(name)
    minicnn.seed(123)
    a = init((4, 6))
    b = init((4, 6))
    minicnn.seed(123)
    np.testing.assert_array_equal(init((4, 6)), a)
    np.testing.assert_array_equal(init((4, 6)), b)
    assert not np.array_equal(a, b)


def test_constants():
    z = initializers.get("zeros")((2, 3))
    o = initializers.get("ones")((4,), dtype="float64")
    c = initializers.constant(0.25)((2, 2))
    assert z.dtype == np.float32 and not z.any()
    assert o.dtype == np.float64 and (o == 1).all()
    assert (c == np.float32(0.25)).all()
    np.testing.assert_array_equal(initializers.Identity(gain=2.0)((2, 3)), [[2, 0, 0], [0, 2, 0]])


@pytest.mark.parametrize("shape", [(6, 4), (2, 5), (3, 3, 2, 8)])
def test_orthogonal(shape):
    minicnn.seed(1)
    q = initializers.get("orthogonal")(shape, dtype="float64").reshape(-1, shape[-1])
    if q.shape[0] >= q.shape[1]:
        np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)
    else:
        np.testing.assert_allclose(q @ q.T, np.eye(q.shape[0]), atol=1e-12)


@pytest.mark.parametrize("identifier, cls", [
    ("glorot_uniform", initializers.GlorotUniform), ("GlorotUniform", initializers.GlorotUniform),
    ("glorot_normal", initializers.GlorotNormal), ("he_normal", initializers.HeNormal),
    ("HeUniform", initializers.HeUniform), ("lecun_normal", initializers.LecunNormal),
    ("zeros", initializers.Zeros), ("zero", initializers.Zeros), ("Ones", initializers.Ones),
    ("one", initializers.Ones), ("uniform", initializers.RandomUniform),
    ("normal", initializers.RandomNormal), ("random_normal", initializers.RandomNormal),
    ("truncated_normal", initializers.TruncatedNormal), ("constant", initializers.Constant),
    ("variance_scaling", initializers.VarianceScaling),
])
def test_get_by_name(identifier, cls):
    assert type(initializers.get(identifier)) is cls


def test_get_passes_through_callables_instances_classes_and_dicts():
    def mine(shape, dtype="float32"):
        return np.full(shape, 7, dtype)

    inst = initializers.RandomNormal(stddev=2.0)
    assert initializers.get(mine) is mine
    assert initializers.get(inst) is inst
    assert isinstance(initializers.get(initializers.HeNormal), initializers.HeNormal)
    assert initializers.get(None) is None
    rebuilt = initializers.get(initializers.serialize(inst))
    assert type(rebuilt) is initializers.RandomNormal and rebuilt.stddev == 2.0
    c = initializers.get({"class_name": "Constant", "config": {"value": 3.0}})
    assert (c((2,)) == 3).all()
    assert initializers.glorot_uniform is initializers.GlorotUniform   # Keras' aliases


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown initializer 'glorot_uniformm'.*glorot_uniform"):
        initializers.get("glorot_uniformm")
    with pytest.raises(TypeError, match="initializers.get: expected a name.*got int"):
        initializers.get(3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="GlorotUniform: shape must be"):
        initializers.get("glorot_uniform")((3, -1))
    with pytest.raises(TypeError, match="HeNormal: dtype must be a floating dtype, got int32"):
        initializers.get("he_normal")((3, 3), dtype="int32")
    with pytest.raises(ValueError, match="scale must be a positive"):
        initializers.VarianceScaling(scale=0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        initializers.VarianceScaling(mode="fan_sum")
    with pytest.raises(ValueError, match="distribution must be one of"):
        initializers.VarianceScaling(distribution="cauchy")
    with pytest.raises(ValueError, match="Orthogonal: needs a shape of rank >= 2"):
        initializers.Orthogonal()((5,))
