"""Optimizers and schedules against hand-written float64 references of the Keras 3 formulas."""
import io
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kernels.backend import to_device, to_numpy
from minicnn import optimizers as opt


class Weight:
    """The optimizer's contract: ``.data`` (changed in place) and ``.grad`` (or None)."""

    def __init__(self, data, name=None):
        self.data = data
        self.grad = None
        self.name = name


# ---------------------------------------------------------------------------- references (float64)

def lr_at(lr, t):
    return lr(t) if callable(lr) else lr


def ref_sgd(w, g, state, t, lr, momentum=0.0, nesterov=False):
    if momentum == 0:
        return w - lr * g
    v = momentum * state.get("v", 0.0) - lr * g
    state["v"] = v
    return w + momentum * v - lr * g if nesterov else w + v


def ref_adam(w, g, state, t, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False):
    m = beta_1 * state.get("m", 0.0) + (1 - beta_1) * g
    v = beta_2 * state.get("v", 0.0) + (1 - beta_2) * g ** 2
    state["m"], state["v"] = m, v
    if amsgrad:
        v = np.maximum(state.get("vhat", 0.0), v)
        state["vhat"] = v
    step = t + 1
    alpha = lr * np.sqrt(1 - beta_2 ** step) / (1 - beta_1 ** step)
    return w - alpha * m / (np.sqrt(v) + epsilon)


def ref_rmsprop(w, g, state, t, lr, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False):
    v = rho * state.get("v", 0.0) + (1 - rho) * g ** 2
    state["v"] = v
    if centered:
        a = rho * state.get("a", 0.0) + (1 - rho) * g
        state["a"] = a
        increment = lr * g / np.sqrt(v - a ** 2 + epsilon)
    else:
        increment = lr * g / np.sqrt(v + epsilon)
    if momentum > 0:
        s = momentum * state.get("s", 0.0) + increment
        state["s"] = s
        return w - s
    return w - increment


def grad_of(w, a, noise):
    """A gradient that depends on the weight (a quadratic bowl) plus a fixed per-step term."""
    return a * w + noise


def run_reference(rule, hyper, w0s, a_s, noises, lr, weight_decay=None):
    """Apply ``rule`` for len(noises) steps to each weight, in float64, with decoupled decay."""
    ws = [w.astype(np.float64) for w in w0s]
    states = [{} for _ in ws]
    for t, step_noise in enumerate(noises):
        lr_t = lr_at(lr, t)
        grads = [grad_of(w, a, n) for w, a, n in zip(ws, a_s, step_noise)]
        if weight_decay:
            ws = [w - w * weight_decay * lr_t for w in ws]
        ws = [rule(w, g, s, t, lr_t, **hyper) for w, g, s in zip(ws, grads, states)]
    return ws


def run_optimizer(optimizer, w0s, a_s, noises, dtype, device="cpu"):
    weights = [Weight(to_device(w.astype(dtype), device)) for w in w0s]
    for step_noise in noises:
        for w, a, n in zip(weights, a_s, step_noise):
            w.grad = to_device(grad_of(to_numpy(w.data).astype(np.float64), a, n).astype(dtype),
                               device)
        optimizer.step(weights)
    return [to_numpy(w.data) for w in weights]


def problem(seed, steps=5, shapes=((3, 4), (5,))):
    rng = np.random.default_rng(seed)
    w0s = [rng.normal(size=s) for s in shapes]
    a_s = [rng.uniform(0.5, 2.0, size=s) for s in shapes]
    noises = [[rng.normal(size=s) for s in shapes] for _ in range(steps)]
    return w0s, a_s, noises


CASES = [
    ("sgd", opt.SGD, ref_sgd, {}),
    ("sgd-momentum", opt.SGD, ref_sgd, {"momentum": 0.9}),
    ("sgd-nesterov", opt.SGD, ref_sgd, {"momentum": 0.8, "nesterov": True}),
    ("adam", opt.Adam, ref_adam, {}),
    ("adam-betas", opt.Adam, ref_adam, {"beta_1": 0.5, "beta_2": 0.8, "epsilon": 1e-3}),
    ("adam-amsgrad", opt.Adam, ref_adam, {"amsgrad": True}),
    ("rmsprop", opt.RMSprop, ref_rmsprop, {}),
    ("rmsprop-momentum", opt.RMSprop, ref_rmsprop, {"momentum": 0.7, "rho": 0.8}),
    ("rmsprop-centered", opt.RMSprop, ref_rmsprop, {"centered": True, "momentum": 0.5}),
]


@pytest.mark.parametrize("label, cls, rule, hyper", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 1e-12, 1e-13),
                                               (np.float32, 2e-5, 2e-6)])
def test_matches_reference_over_several_steps(label, cls, rule, hyper, dtype, rtol, atol):
    w0s, a_s, noises = problem(seed=len(label), steps=6)
    got = run_optimizer(cls(learning_rate=0.05, **hyper), w0s, a_s, noises, dtype)
    want = run_reference(rule, hyper, w0s, a_s, noises, lr=0.05)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@given(beta_1=st.floats(0.0, 0.99), beta_2=st.floats(0.0, 0.9999), amsgrad=st.booleans(),
       epsilon=st.sampled_from([1e-7, 1e-3, 0.1]), lr=st.floats(1e-3, 0.5), seed=st.integers(0, 99))
def test_adam_hyperparameters(beta_1, beta_2, amsgrad, epsilon, lr, seed):
    hyper = {"beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "amsgrad": amsgrad}
    w0s, a_s, noises = problem(seed, steps=4, shapes=((2, 3),))
    got = run_optimizer(opt.Adam(learning_rate=lr, **hyper), w0s, a_s, noises, np.float64)
    want = run_reference(ref_adam, hyper, w0s, a_s, noises, lr=lr)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)


@given(rho=st.floats(0.5, 0.99), momentum=st.floats(0.0, 0.95), centered=st.booleans(),
       lr=st.floats(1e-3, 0.5), seed=st.integers(0, 99))
def test_rmsprop_hyperparameters(rho, momentum, centered, lr, seed):
    hyper = {"rho": rho, "momentum": momentum, "centered": centered, "epsilon": 1e-7}
    w0s, a_s, noises = problem(seed, steps=4, shapes=((2, 3),))
    got = run_optimizer(opt.RMSprop(learning_rate=lr, **hyper), w0s, a_s, noises, np.float64)
    want = run_reference(ref_rmsprop, hyper, w0s, a_s, noises, lr=lr)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cls, rule, hyper", [(opt.AdamW, ref_adam, {}),
                                              (opt.SGD, ref_sgd, {"momentum": 0.9}),
                                              (opt.RMSprop, ref_rmsprop, {})])
def test_decoupled_weight_decay_over_several_steps(cls, rule, hyper):
    w0s, a_s, noises = problem(seed=3, steps=5)
    got = run_optimizer(cls(learning_rate=0.1, weight_decay=0.3, **hyper), w0s, a_s, noises,
                        np.float64)
    want = run_reference(rule, hyper, w0s, a_s, noises, lr=0.1, weight_decay=0.3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------- known values by hand

def one_step(optimizer, w, g, steps=1):
    weight = Weight(np.array([w], dtype=np.float64))
    for _ in range(steps):
        weight.grad = np.array([g], dtype=np.float64)
        optimizer.step([weight])
    return weight.data[0]


def test_sgd_known_values():
    assert one_step(opt.SGD(0.1), 1.0, 2.0) == pytest.approx(0.8, abs=1e-15)
    # v1 = -0.2, w1 = 0.8;  v2 = 0.9 * -0.2 - 0.2 = -0.38, w2 = 0.42
    assert one_step(opt.SGD(0.1, momentum=0.9), 1.0, 2.0, steps=2) == pytest.approx(0.42, abs=1e-15)
    # nesterov: w1 = 1 + 0.9 * -0.2 - 0.2 = 0.62;  w2 = 0.62 + 0.9 * -0.38 - 0.2 = 0.078
    assert one_step(opt.SGD(0.1, momentum=0.9, nesterov=True), 1.0, 2.0) == pytest.approx(0.62)
    assert one_step(opt.SGD(0.1, momentum=0.9, nesterov=True), 1.0, 2.0,
                    steps=2) == pytest.approx(0.078, abs=1e-15)


def test_adam_known_value_and_where_epsilon_enters():
    # m = 0.2, v = 0.004, alpha = 0.1 * sqrt(0.001) / 0.1; w = 1 - alpha * 0.2 / (sqrt(0.004) + 1e-7)
    #   = 1 - 0.1 * 0.0632455532 / 0.0632456532 = 0.9000001581
    w = one_step(opt.Adam(learning_rate=0.1), 1.0, 2.0)
    assert w == pytest.approx(0.90000015811, abs=1e-11)
    pytorch_placement = 1 - 0.1 * 2.0 / (2.0 + 1e-7)      # eps after bias correction: 0.900000005
    assert abs(w - pytorch_placement) > 1e-7


def test_adamw_known_value():
    # decay first: 1 - 1 * 0.004 * 0.1 = 0.9996, then the Adam step above (0.0999998419)
    w = one_step(opt.AdamW(learning_rate=0.1), 1.0, 2.0)
    assert w == pytest.approx(0.9996 - 0.1 * 0.0632455532 / 0.0632456532, abs=1e-10)


def test_rmsprop_known_values():
    # Keras' docstring example: var 10, loss var^2 / 2 (gradient 10), lr 0.1 -> 9.683772
    assert one_step(opt.RMSprop(learning_rate=0.1), 10.0, 10.0) == pytest.approx(9.683772, abs=1e-6)
    # centered: v = 10, a = 1, step = 0.1 * 10 / sqrt(10 - 1 + 1e-7) = 0.33333333
    w = one_step(opt.RMSprop(learning_rate=0.1, centered=True), 10.0, 10.0)
    assert w == pytest.approx(10 - 1 / math.sqrt(9 + 1e-7), abs=1e-12)
    assert w == pytest.approx(9.6666666, abs=1e-7)


def test_sgd_weight_decay_known_value():
    # w = 2 - 2 * 0.5 * 0.1 = 1.9, then 1.9 - 0.1 * 1 = 1.8
    assert one_step(opt.SGD(0.1, weight_decay=0.5), 2.0, 1.0) == pytest.approx(1.8, abs=1e-15)


def test_weight_decay_exclusions_and_grad_none():
    a = Weight(np.array([2.0]), name="dense/kernel")
    b = Weight(np.array([2.0]), name="dense/bias")
    c = Weight(np.array([2.0]), name="frozen")
    sgd = opt.SGD(0.1, weight_decay=0.5)
    sgd.exclude_from_weight_decay(var_names=["bias"])
    a.grad, b.grad = np.array([1.0]), np.array([1.0])
    sgd.step([a, b, c])
    assert a.data[0] == pytest.approx(1.8)
    assert b.data[0] == pytest.approx(1.9)          # no decay
    assert c.data[0] == 2.0                         # no gradient: untouched, not even decayed
    assert sgd.iterations == 1


def test_step_works_in_place():
    w = Weight(np.ones((2, 2), np.float32))
    before = w.data
    w.grad = np.ones((2, 2), np.float32)
    grad_before = w.grad.copy()
    opt.Adam(0.1).step([w])
    assert w.data is before and w.data.dtype == np.float32
    np.testing.assert_array_equal(w.grad, grad_before)


def test_float64_gradient_of_float32_weight_keeps_float32():
    w = Weight(np.ones(3, np.float32))
    w.grad = np.ones(3, np.float64)
    opt.RMSprop(0.1, centered=True).step([w])
    assert w.data.dtype == np.float32


# ---------------------------------------------------------------------------- clipping

def sgd_deltas(grads, **clip):
    weights = [Weight(np.zeros(len(g))) for g in grads]
    for w, g in zip(weights, grads):
        w.grad = np.array(g, dtype=np.float64)
    opt.SGD(learning_rate=1.0, **clip).step(weights)
    return [-w.data for w in weights]


def test_clipnorm_is_per_weight():
    big, small = sgd_deltas([[3.0, 4.0], [0.3, 0.4]], clipnorm=1.0)
    np.testing.assert_allclose(big, [0.6, 0.8], rtol=1e-14)
    np.testing.assert_allclose(small, [0.3, 0.4], rtol=1e-14)


def test_global_clipnorm_scales_all_by_one_factor():
    a, b = sgd_deltas([[3.0], [4.0]], global_clipnorm=1.0)     # global norm 5
    np.testing.assert_allclose([a[0], b[0]], [0.6, 0.8], rtol=1e-14)
    a, b = sgd_deltas([[3.0], [4.0]], clipnorm=1.0)            # each on its own: 1, 1
    np.testing.assert_allclose([a[0], b[0]], [1.0, 1.0], rtol=1e-14)
    a, b = sgd_deltas([[0.3], [0.4]], global_clipnorm=1.0)     # below the limit: unchanged
    np.testing.assert_allclose([a[0], b[0]], [0.3, 0.4], rtol=1e-14)


def test_global_clipnorm_of_a_non_finite_norm_gives_nan():
    a, b = sgd_deltas([[np.inf], [1.0]], global_clipnorm=1.0)
    assert np.isnan(a).all() and np.isnan(b).all()


def test_clipvalue():
    (d,) = sgd_deltas([[-2.0, 0.1, 3.0]], clipvalue=0.5)
    np.testing.assert_array_equal(d, [-0.5, 0.1, 0.5])


def test_clipping_happens_before_weight_decay_and_momentum():
    w = Weight(np.array([1.0]))
    w.grad = np.array([10.0])
    o = opt.SGD(0.1, momentum=0.5, weight_decay=0.2, clipnorm=1.0)
    o.step([w])
    # decay 1 - 1 * 0.2 * 0.1 = 0.98; v = -0.1 * 1 (clipped); w = 0.88
    assert w.data[0] == pytest.approx(0.88, abs=1e-15)


# ---------------------------------------------------------------------------- schedules

def test_exponential_and_step_decay():
    s = opt.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.1 * 0.5 ** 0.5)
    assert s(25) == pytest.approx(0.1 * 0.5 ** 2.5)
    st_ = opt.ExponentialDecay(0.1, 10, 0.5, staircase=True)
    assert st_(9) == pytest.approx(0.1) and st_(15) == pytest.approx(0.05) and st_(20) == pytest.approx(0.025)
    step = opt.StepDecay(0.1, 10, 0.5)
    assert [step(t) for t in (0, 9, 10, 19, 20)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_piecewise_constant_decay():
    s = opt.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])
    assert [s(t) for t in (0, 10, 11, 20, 21, 1000)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
    with pytest.raises(ValueError, match="one element less"):
        opt.PiecewiseConstantDecay([10, 20], [1.0, 0.5])
    with pytest.raises(ValueError, match="increase strictly"):
        opt.PiecewiseConstantDecay([20, 10], [1.0, 0.5, 0.1])


def test_cosine_decay():
    s = opt.CosineDecay(1.0, decay_steps=100, alpha=0.1)
    assert s(0) == pytest.approx(1.0)
    assert s(50) == pytest.approx(0.9 * 0.5 + 0.1)
    assert s(25) == pytest.approx(0.9 * 0.5 * (1 + math.cos(math.pi / 4)) + 0.1)
    assert s(100) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_cosine_decay_with_warmup():
    s = opt.CosineDecay(0.0, decay_steps=100, warmup_target=1.0, warmup_steps=10)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(1000) == pytest.approx(0.0, abs=1e-15)


def test_linear_warmup():
    after = opt.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)
    s = opt.warmup(after, warmup_steps=4)
    assert [s(t) for t in (0, 1, 2, 4, 5, 6)] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.1, 0.05])
    const = opt.LinearWarmup(0.3, warmup_steps=3, initial_learning_rate=0.1)
    assert [const(t) for t in (0, 1, 3, 10)] == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.3, 0.3])


def test_schedule_is_read_at_the_iteration_count_from_zero():
    lr = opt.PiecewiseConstantDecay([1], [1.0, 0.5])    # steps 0, 1 -> 1.0; then 0.5
    sgd = opt.SGD(learning_rate=lr)
    w = Weight(np.array([0.0]))
    seen = []
    for _ in range(3):
        seen.append(sgd.learning_rate)
        assert sgd.current_learning_rate() == seen[-1]
        w.grad = np.array([1.0])
        sgd.step([w])
    assert seen == [1.0, 1.0, 0.5]
    assert w.data[0] == pytest.approx(-2.5)
    with pytest.raises(TypeError, match="cannot be set to a float"):
        sgd.learning_rate = 0.1


def test_schedule_in_adam_matches_reference():
    lr = opt.CosineDecay(0.1, decay_steps=4, warmup_target=0.2, warmup_steps=2)
    w0s, a_s, noises = problem(seed=9, steps=7)
    got = run_optimizer(opt.Adam(learning_rate=lr), w0s, a_s, noises, np.float64)
    want = run_reference(ref_adam, {}, w0s, a_s, noises, lr=lr)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)


def test_schedule_arguments():
    with pytest.raises(ValueError, match="decay_steps must be > 0"):
        opt.ExponentialDecay(0.1, 0, 0.5)
    with pytest.raises(ValueError, match="decay_steps must be > 0"):
        opt.CosineDecay(0.1, 0)
    cfg = opt.schedules.serialize(opt.warmup(opt.CosineDecay(0.1, 10), 5))
    again = opt.schedules.deserialize(cfg)
    assert [again(t) for t in range(20)] == [opt.warmup(opt.CosineDecay(0.1, 10), 5)(t)
                                             for t in range(20)]


# ---------------------------------------------------------------------------- state and resume

RESUME_CASES = [
    lambda: opt.SGD(0.1),
    lambda: opt.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda: opt.Adam(0.01, amsgrad=True, global_clipnorm=2.0),
    lambda: opt.AdamW(learning_rate=opt.CosineDecay(0.02, 10, warmup_target=0.05, warmup_steps=3)),
    lambda: opt.RMSprop(0.01, momentum=0.5, centered=True, clipnorm=1.0),
]


def train(optimizer, weights, noises, a_s):
    for step_noise in noises:
        for w, a, n in zip(weights, a_s, step_noise):
            w.grad = None if n is None else grad_of(w.data, a, n).astype(w.data.dtype)
        optimizer.step(weights)


def through_npz(state):
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("make", RESUME_CASES)
def test_resume_equals_uninterrupted(make):
    w0s, a_s, noises = problem(seed=4, steps=8, shapes=((3, 2), (4,), (2,)))
    noises = [n[:2] + [None] for n in noises]           # the third weight never gets a gradient
    full = [Weight(w.astype(np.float32)) for w in w0s]
    train(make(), full, noises, a_s)

    first = [Weight(w.astype(np.float32)) for w in w0s]
    o1 = make()
    train(o1, first, noises[:3], a_s)
    state = through_npz(o1.get_state())
    second = [Weight(w.data.copy()) for w in first]     # a fresh model with the saved weights
    o2 = make()
    o2.set_state(state)                                 # before the first step: kept pending
    assert o2.get_state().keys() == state.keys()
    train(o2, second, noises[3:], a_s)
    for a, b in zip(full, second):
        np.testing.assert_array_equal(a.data, b.data)
    assert o2.iterations == 8


def test_state_names_and_set_after_build():
    ws = [Weight(np.zeros((2, 3))), Weight(np.zeros(3))]
    adam = opt.Adam(0.1)
    ws[0].grad, ws[1].grad = np.ones((2, 3)), np.ones(3)
    adam.step(ws)
    state = adam.get_state()
    assert set(state) == {"iterations", "learning_rate", "momentum/0", "velocity/0",
                          "momentum/1", "velocity/1"}
    assert state["iterations"] == 1 and state["momentum/1"].shape == (3,)
    other = opt.Adam(0.5)
    other.build(ws)
    other.set_state(state)
    assert other.learning_rate == 0.1 and other.iterations == 1
    for k in ("momentum/0", "velocity/1"):
        np.testing.assert_array_equal(other.get_state()[k], state[k])
    state["momentum/0"][...] = 7.0                      # a copy, not a view, was stored
    assert not (other.get_state()["momentum/0"] == 7.0).any()


def test_set_state_rejects_mismatches():
    ws = [Weight(np.zeros((2, 3)))]
    ws[0].grad = np.ones((2, 3))
    adam = opt.Adam()
    adam.step(ws)
    state = adam.get_state()
    with pytest.raises(ValueError, match="unexpected entry 'momentum/0'"):
        opt.RMSprop().set_state(state)
    with pytest.raises(ValueError, match="no 'iterations' entry"):
        opt.Adam().set_state({k: v for k, v in state.items() if k != "iterations"})
    with pytest.raises(ValueError, match="'velocity/0' is missing"):
        opt.Adam().set_state({k: v for k, v in state.items() if k != "velocity/0"})
    wrong = opt.Adam()
    wrong.set_state(state)
    with pytest.raises(ValueError, match=r"'momentum/0' has shape \(2, 3\), weight 0 has shape \(4,\)"):
        w = Weight(np.zeros(4))
        w.grad = np.ones(4)
        wrong.step([w])
    with pytest.raises(ValueError, match="slots for 1 weights, the optimizer has 2"):
        two = [Weight(np.zeros((2, 3))), Weight(np.zeros(3))]
        for w in two:
            w.grad = np.ones_like(w.data)
        fresh = opt.Adam()
        fresh.build(two)
        fresh.set_state(state)


# ---------------------------------------------------------------------------- convergence

@pytest.mark.parametrize("make, steps, tol", [
    (lambda: opt.SGD(0.1), 300, 1e-4),
    (lambda: opt.SGD(0.05, momentum=0.9), 300, 1e-4),
    (lambda: opt.SGD(0.05, momentum=0.9, nesterov=True), 300, 1e-4),
    (lambda: opt.Adam(0.05), 600, 1e-3),
    (lambda: opt.Adam(0.05, amsgrad=True), 600, 1e-3),
    (lambda: opt.AdamW(0.05, weight_decay=1e-4), 600, 1e-2),
    (lambda: opt.RMSprop(0.01), 600, 2e-2),
    (lambda: opt.RMSprop(0.005, momentum=0.5, centered=True), 600, 2e-2),
])
def test_quadratic_bowl_converges(make, steps, tol):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2.0, size=(4, 5))
    center = rng.normal(size=(4, 5))
    w = Weight(np.zeros((4, 5)))
    o = make()
    for _ in range(steps):
        w.grad = a * (w.data - center)
        o.step([w])
    assert np.abs(w.data - center).max() < tol


# ---------------------------------------------------------------------------- lookup, arguments

def test_get():
    assert type(opt.get("adam")) is opt.Adam and opt.get("Adam").learning_rate == 0.001
    assert type(opt.get("SGD")) is opt.SGD and opt.get("sgd").learning_rate == 0.01
    assert type(opt.get("adamw")) is opt.AdamW and opt.get("adamw").weight_decay == 0.004
    assert type(opt.get("RMSprop", learning_rate=0.5)) is opt.RMSprop
    assert opt.get("rmsprop", learning_rate=0.5).learning_rate == 0.5
    inst = opt.SGD(0.3)
    assert opt.get(inst) is inst and inst.learning_rate == 0.3
    assert opt.get(inst, learning_rate=0.2).learning_rate == 0.2
    again = opt.get(opt.serialize(opt.Adam(learning_rate=opt.StepDecay(0.1, 5, 0.5), amsgrad=True)))
    assert again.amsgrad and again.learning_rate == 0.1 and isinstance(again._learning_rate, opt.StepDecay)
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'.*'adam'"):
        opt.get("adagrad")
    with pytest.raises(TypeError, match="cannot interpret"):
        opt.get(3)


def test_keras_defaults():
    a = opt.Adam()
    assert (a.learning_rate, a.beta_1, a.beta_2, a.epsilon, a.amsgrad) == (0.001, 0.9, 0.999, 1e-7, False)
    r = opt.RMSprop()
    assert (r.learning_rate, r.rho, r.momentum, r.epsilon, r.centered) == (0.001, 0.9, 0.0, 1e-7, False)
    s = opt.SGD()
    assert (s.learning_rate, s.momentum, s.nesterov, s.weight_decay) == (0.01, 0.0, False, None)
    w = opt.AdamW()
    assert (w.learning_rate, w.weight_decay) == (0.001, 0.004)


def test_bad_arguments():
    with pytest.raises(ValueError, match="only one of clipnorm, clipvalue and global_clipnorm"):
        opt.SGD(clipnorm=1.0, global_clipnorm=1.0)
    with pytest.raises(ValueError, match="SGD: momentum must be a float in"):
        opt.SGD(momentum=1.5)
    with pytest.raises(ValueError, match="AdamW: weight_decay must be a float"):
        opt.AdamW(weight_decay=None)
    with pytest.raises(ValueError, match="beta_1 must be a float in"):
        opt.Adam(beta_1=1.0)
    with pytest.raises(TypeError, match="learning_rate must be a float"):
        opt.Adam(learning_rate="fast")
    w = Weight(np.zeros((2, 3)))
    w.grad = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"gradient of shape \(3, 2\) for weight 0 of shape \(2, 3\)"):
        opt.Adam().step([w])
    w.grad = None
    with pytest.raises(ValueError, match="no gradient for any"):
        opt.Adam().step([w])
    w.grad = np.zeros((2, 3))
    with pytest.raises(ValueError, match="appears twice"):
        opt.SGD().step([w, w])
    opt.SGD().step([])                                  # nothing to do


# ---------------------------------------------------------------------------- devices, Tensor

@pytest.mark.parametrize("make", RESUME_CASES)
def test_device_matches_numpy(make, device):
    w0s, a_s, noises = problem(seed=2, steps=4)
    on_cpu = run_optimizer(make(), w0s, a_s, noises, np.float32, "cpu")
    o = make()
    on_device = run_optimizer(o, w0s, a_s, noises, np.float32, device)
    for c, d in zip(on_cpu, on_device):
        np.testing.assert_allclose(d, c, rtol=1e-5, atol=1e-6)
    assert all(isinstance(v, (np.ndarray, int, float)) for v in o.get_state().values())


def test_slots_follow_a_weight_to_another_device(device):
    w = Weight(np.ones(3, np.float32))
    adam = opt.Adam(0.1)
    w.grad = np.ones(3, np.float32)
    adam.step([w])
    w.data = to_device(w.data, device)
    w.grad = to_device(np.ones(3, np.float32), device)
    adam.step([w])
    ref = Weight(np.ones(3, np.float32))
    ref_opt = opt.Adam(0.1)
    for _ in range(2):
        ref.grad = np.ones(3, np.float32)
        ref_opt.step([ref])
    np.testing.assert_allclose(to_numpy(w.data), ref.data, rtol=1e-6)


def test_works_on_minicnn_tensors():
    import minicnn
    t = minicnn.Tensor(np.ones((2, 2), np.float32), requires_grad=True)
    t.grad = np.full((2, 2), 2.0, np.float32)
    opt.SGD(0.25).step([t])
    np.testing.assert_array_equal(t.data, np.full((2, 2), 0.5, np.float32))
