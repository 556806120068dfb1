"""Mixed precision (minicnn.mixed_precision), on the CPU and, through the ``device`` fixture,
on a GPU:

- policies with Keras 3's names and errors; layers take the global policy when made, or their
  own ``dtype=``; float32 master weights read through a differentiable cast;
- BatchNormalization and the losses compute in float32 under a 16-bit policy;
- loss scaling (Keras' LossScaleOptimizer): scale, unscale, skip and halve on inf/NaN, double
  after ``dynamic_growth_steps`` finite steps, state for checkpoints, compile's auto-wrap;
- the U-Net's operations in float16 and bfloat16 against float32 on the same (rounded) inputs,
  forward and backward, to 2 machine epsilons of the low precision (float16 eps = 2**-10,
  bfloat16 eps = 2**-7) times the largest float32 value;
- a tiny U-Net trains under mixed_float16 and mixed_bfloat16 on the CPU as it does in float32.
"""
from __future__ import annotations

import numpy as np
import pytest

import minicnn as mc
from kernels import backend
from kernels.backend import to_device, to_numpy
from minicnn import functions as F
from minicnn import layers as kl
from minicnn import mixed_precision as mp
from minicnn.tensor import Tensor

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs the ml_dtypes package "
                                "(in the test extra)")
BF16 = np.dtype(ml_dtypes.bfloat16)
LOW = {"float16": np.dtype(np.float16), "bfloat16": BF16}
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


@pytest.fixture(autouse=True)
def float32_afterwards():
    """Every test starts and ends with the float32 policy and TF32 off."""
    mp.set_global_policy("float32")
    tf32 = backend.tf32_enabled()
    yield
    mp.set_global_policy("float32")
    backend.set_tf32(tf32)


def on(device, array):
    """``array`` on ``device``; a GPU without bfloat16 support skips, saying why."""
    try:
        return to_device(array, device)
    except Exception as error:          # CuPy without ml_dtypes' bfloat16
        pytest.skip(f"CuPy cannot hold {array.dtype} arrays here ({type(error).__name__}: "
                    f"{error})")


# ============================================================================ policies

@pytest.mark.parametrize("name, compute, variable", [
    ("float32", "float32", "float32"), ("float64", "float64", "float64"),
    ("mixed_float16", "float16", "float32"), ("mixed_bfloat16", "bfloat16", "float32"),
    ("float16", "float16", "float16"), ("bfloat16", "bfloat16", "bfloat16")])
def test_policy_names_give_keras_dtypes(name, compute, variable):
    policy = mp.DTypePolicy(name)
    assert (policy.name, policy.compute_dtype, policy.variable_dtype) == (name, compute, variable)
    assert policy.is_mixed == (compute != variable)
    assert repr(policy) == f'<DTypePolicy "{name}">'
    assert mp.Policy is mp.DTypePolicy
    assert mp.DTypePolicy.from_config(policy.get_config()) == policy
    assert policy != mp.DTypePolicy("float64" if name != "float64" else "float32")


def test_bad_policies_raise_as_keras():
    with pytest.raises(ValueError, match="Cannot convert 'int32' to a mixed precision DTypePolicy"):
        mp.DTypePolicy("int32")
    with pytest.raises(ValueError, match="Cannot convert 'mixed_float32'"):
        mp.DTypePolicy("mixed_float32")
    with pytest.raises(TypeError, match="'name' must be a string"):
        mp.DTypePolicy(16)
    with pytest.raises(ValueError, match="Invalid `policy` argument"):
        mp.set_global_policy(3.0)


def test_bfloat16_without_ml_dtypes_says_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_ml_dtypes(name, *args, **kwargs):
        if name == "ml_dtypes":
            raise ImportError("no ml_dtypes here")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ml_dtypes)
    assert not mp.bfloat16_available()
    with pytest.raises(RuntimeError, match="pip install ml_dtypes"):
        mp.DTypePolicy("mixed_bfloat16")
    with pytest.raises(RuntimeError, match="pip install ml_dtypes"):
        mp.set_precision("bf16")
    assert mp.DTypePolicy("mixed_float16").compute_dtype == "float16"


def test_global_policy_is_read_when_a_layer_is_made():
    assert mp.global_policy() == mp.DTypePolicy("float32")
    mp.set_global_policy("mixed_float16")
    assert mp.global_policy().name == "mixed_float16" and mp.dtype_policy() is mp.global_policy()
    mixed = kl.Conv2D(2, 3)
    own = kl.Conv2D(2, 3, dtype="float32")
    explicit = kl.Dense(3, dtype=mp.DTypePolicy("mixed_bfloat16"))
    mp.set_global_policy("float32")
    later = kl.Conv2D(2, 3)
    assert mixed.dtype_policy.name == "mixed_float16"
    assert (mixed.dtype, mixed.variable_dtype, mixed.compute_dtype) == ("float32", "float32",
                                                                        "float16")
    assert own.dtype_policy.name == "float32" and own.compute_dtype == "float32"
    assert explicit.compute_dtype == BF16 and explicit.dtype == "float32"
    assert later.dtype_policy.name == "float32"
    assert mp.DTypePolicy().name == "float32"          # None: the global policy's name


def test_set_precision_presets():
    assert mp.set_precision("fp16").name == "mixed_float16" and not mp.tensor_float_32_execution_enabled()
    assert mp.set_precision("bf16").name == "mixed_bfloat16"
    assert mp.set_precision("tf32").name == "float32" and mp.tensor_float_32_execution_enabled()
    assert mp.set_precision("float32").name == "float32"
    assert not mp.tensor_float_32_execution_enabled()
    with pytest.raises(ValueError, match="precision must be one of"):
        mp.set_precision("fp8")


# ============================================================================ casting, master weights

@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_cast_is_differentiable_and_returns_the_source_dtype(device, low):
    x = Tensor(on(device, np.array([0.1, -2.0, 3.0], np.float32)), requires_grad=True)
    y = mp.cast(x, low)
    assert y.dtype == LOW[low] and y.device == device
    (y * y).sum().backward()                       # d/dx sum y^2 = 2 y, back in float32
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(to_numpy(x.grad), 2 * to_numpy(y.data).astype(np.float32))
    assert mp.cast(x, "float32") is x


@pytest.mark.parametrize("policy, low", [("mixed_float16", "float16"),
                                         ("mixed_bfloat16", "bfloat16")])
def test_layers_keep_float32_weights_and_compute_low(device, policy, low, rng):
    mp.set_global_policy(policy)
    conv = kl.Conv2D(3, 3, padding="same")
    dense = kl.Dense(2)
    host = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    dense(conv(host))                                # build on the CPU, then move
    conv.to(device), dense.to(device)
    x = on(device, host)
    y = conv(x)                                      # the image is cast on the way in
    assert y.dtype == LOW[low] and conv.kernel.dtype == np.float32
    z = dense(y)
    assert z.dtype == LOW[low] and dense.kernel.dtype == np.float32
    z.sum().backward()
    for w in conv.weights + dense.weights:
        assert w.dtype == np.float32 and w.grad.dtype == np.float32, w.name
    # the low-precision product used the kernel rounded to the compute dtype
    kernel = to_numpy(conv.kernel.data).astype(LOW[low]).astype(np.float32)
    ref = F.conv2d(Tensor(to_numpy(x).astype(LOW[low]).astype(np.float32)), kernel,
                   to_numpy(conv.bias.data), padding="same").data
    assert np.abs(to_numpy(y.data).astype(np.float32) - ref).max() <= \
        2 * EPS[low] * np.abs(ref).max()


def test_mixed_layers_autocast_tensors_float32_layers_refuse(rng):
    x = Tensor(rng.standard_normal((1, 5, 5, 2)).astype(np.float32), requires_grad=True)
    mp.set_global_policy("mixed_float16")
    y = kl.Conv2D(2, 3)(x)                           # a float32 tensor with a gradient: cast
    y.sum().backward()
    assert y.dtype == np.float16 and x.grad.dtype == np.float32
    mp.set_global_policy("float32")
    with pytest.raises(TypeError, match="input dtype float16 differs from the layer's float32"):
        kl.Conv2D(2, 3)(y)


def test_batch_norm_statistics_in_float32(device, rng):
    """float16 input of mean 300 and spread 1: float16 holds 300 +- 1 only to 0.25 (a float16
    mean/variance pass would be off by that much); the layer's float32 statistics equal the
    float32 mean and (biased) variance of the float16-rounded input."""
    mp.set_global_policy("mixed_float16")
    layer = kl.BatchNormalization(momentum=0.0)
    x16 = (300 + rng.standard_normal((4, 6, 6, 3))).astype(np.float16)
    layer(x16[:1])                                   # build on the CPU, then move
    layer.to(device)
    xt = Tensor(on(device, x16), requires_grad=True)
    y = layer(xt, training=True)
    assert y.dtype == np.float16
    assert layer.moving_mean.dtype == np.float32 and layer.gamma.dtype == np.float32
    x32 = x16.astype(np.float32)
    mean, var = x32.mean(axis=(0, 1, 2)), x32.var(axis=(0, 1, 2))
    np.testing.assert_allclose(to_numpy(layer.moving_mean.data), mean, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(layer.moving_variance.data), var, rtol=1e-4)
    ref = (x32 - mean) / np.sqrt(var + 1e-3)
    assert np.abs(to_numpy(y.data).astype(np.float32) - ref).max() <= 2 * EPS["float16"] * 3
    y.sum().backward()
    assert xt.grad.dtype == np.float16 and layer.gamma.grad.dtype == np.float32
    inference = layer(on(device, x16), training=False)
    assert inference.dtype == np.float16


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_losses_compute_in_float32(device, low, rng):
    logits = rng.standard_normal((2, 4, 4, 3)).astype(LOW[low])
    labels = rng.integers(0, 3, (2, 4, 4))
    loss_fn = mc.losses.SparseCategoricalCrossentropy(from_logits=True)
    z = Tensor(on(device, logits), requires_grad=True)
    loss = loss_fn(on(device, labels), z)
    assert loss.dtype == np.float32
    loss.backward()
    assert z.grad.dtype == LOW[low]
    z32 = Tensor(logits.astype(np.float32), requires_grad=True)
    ref = loss_fn(labels, z32)
    ref.backward()
    assert float(to_numpy(loss.data)) == pytest.approx(float(ref.data), rel=1e-6)
    assert np.abs(to_numpy(z.grad).astype(np.float32) - z32.grad).max() <= \
        EPS[low] * np.abs(z32.grad).max()


# ============================================================================ loss scaling

def quadratic(value=1.0):
    w = Tensor(np.array([value], np.float32), requires_grad=True, name="w")
    return w, (lambda: (w * w).sum())


def test_loss_scale_optimizer_keras_example():
    """Keras' docstring example: SGD(0.25) wrapped, var = 1, loss = var**2 -> var = 0.5."""
    opt = mp.LossScaleOptimizer(mc.optimizers.SGD(0.25))
    assert opt.dynamic_scale == 2.0 ** 15 and opt.dynamic_growth_steps == 2000
    w, loss = quadratic()
    scaled = opt.scale_loss(loss())
    assert float(scaled.data) == 2.0 ** 15
    scaled.backward()
    assert float(w.grad[0]) == 2.0 ** 16                    # d(s w^2)/dw = 2 s w
    opt.step([w])
    assert float(w.data[0]) == 0.5 and float(w.grad[0]) == 2.0    # .grad holds the unscaled
    assert opt.iterations == 1 and opt.step_counter == 1


def test_finite_steps_equal_the_inner_optimizer_and_the_scale_doubles():
    reference, scaled = mc.optimizers.Adam(0.1), mp.LossScaleOptimizer(
        mc.optimizers.Adam(0.1), initial_scale=8.0, dynamic_growth_steps=3)
    w_ref, loss_ref = quadratic(2.0)
    w, loss = quadratic(2.0)
    scales = []
    for _ in range(7):
        w_ref.grad = None
        loss_ref().backward()
        reference.step([w_ref])
        w.grad = None
        scaled.scale_loss(loss()).backward()
        scaled.step([w])
        scales.append(scaled.dynamic_scale)
        np.testing.assert_array_equal(w.data, w_ref.data)       # powers of two: exact
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]
    assert scaled.iterations == reference.iterations == 7


def test_non_finite_gradients_skip_the_step_and_halve_the_scale():
    opt = mp.LossScaleOptimizer(mc.optimizers.Adam(0.1), initial_scale=64.0,
                                dynamic_growth_steps=2)
    w, loss = quadratic(3.0)
    other = Tensor(np.ones(2, np.float32), requires_grad=True)
    opt.scale_loss(loss()).backward()
    other.grad = np.ones(2, np.float32)
    opt.step([w, other])                                   # finite: applied, counter 1
    assert opt.iterations == 1 and opt.step_counter == 1
    before = (w.data.copy(), other.data.copy(), {k: v.copy() for k, v in opt.get_state().items()
                                                 if isinstance(v, np.ndarray)})
    for bad in (np.inf, np.nan, -np.inf):
        w.grad = np.array([1.0], np.float32)
        other.grad = np.array([0.5, bad], np.float32)
        opt.step([w, other])
    assert opt.dynamic_scale == 8.0 and opt.step_counter == 0 and opt.iterations == 1
    np.testing.assert_array_equal(w.data, before[0])
    np.testing.assert_array_equal(other.data, before[1])
    for key, value in before[2].items():
        np.testing.assert_array_equal(opt.get_state()[key], value)
    for _ in range(2):                                      # two finite steps: scale 16
        w.grad, other.grad = np.ones(1, np.float32), np.ones(2, np.float32)
        opt.step([w, other])
    assert opt.dynamic_scale == 16.0 and opt.iterations == 3


def test_loss_scale_state_round_trips_and_delegates():
    opt = mp.LossScaleOptimizer(mc.optimizers.SGD(0.1, momentum=0.9), initial_scale=4.0)
    w, loss = quadratic()
    opt.scale_loss(loss()).backward()
    opt.step([w])
    state = opt.get_state()
    assert state["loss_scale"] == 4.0 and state["loss_scale_steps"] == 1
    fresh = mp.LossScaleOptimizer(mc.optimizers.SGD(0.1, momentum=0.9))
    fresh.build([Tensor(np.zeros(1, np.float32), requires_grad=True)])
    fresh.set_state(state)
    assert fresh.dynamic_scale == 4.0 and fresh.step_counter == 1 and fresh.iterations == 1
    np.testing.assert_array_equal(fresh.get_state()["momentum/0"], state["momentum/0"])
    assert opt.learning_rate == pytest.approx(0.1)
    opt.learning_rate = 0.05
    assert opt.inner_optimizer.learning_rate == pytest.approx(0.05)
    assert opt.current_learning_rate() == pytest.approx(0.05)
    assert mc.optimizers.get(opt) is opt
    again = mp.LossScaleOptimizer.from_config(opt.get_config())
    assert isinstance(again.inner_optimizer, mc.optimizers.SGD)
    assert again.initial_scale == 4.0 and again.inner_optimizer.momentum == 0.9


def test_loss_scale_optimizer_checks_its_arguments():
    with pytest.raises(TypeError, match="inner_optimizer must be a minicnn optimizer"):
        mp.LossScaleOptimizer("adam")
    with pytest.raises(TypeError, match="not itself loss-scaled"):
        mp.LossScaleOptimizer(mp.LossScaleOptimizer(mc.optimizers.SGD()))
    with pytest.raises(ValueError, match="initial_scale must be a positive finite"):
        mp.LossScaleOptimizer(mc.optimizers.SGD(), initial_scale=0)
    with pytest.raises(ValueError, match="dynamic_growth_steps must be an int >= 1"):
        mp.LossScaleOptimizer(mc.optimizers.SGD(), dynamic_growth_steps=0)
    with pytest.raises(ValueError, match="no gradient for any of the 1 weights"):
        mp.LossScaleOptimizer(mc.optimizers.SGD()).step([quadratic()[0]])


def tiny_unet():
    model = mc.models.UNet(num_classes=2, base_filters=4, depth=2)
    return model


@pytest.mark.parametrize("policy, wrapped", [("mixed_float16", True), ("mixed_bfloat16", False),
                                             ("float32", False)])
def test_compile_wraps_the_optimizer_under_mixed_float16(policy, wrapped):
    mp.set_global_policy(policy)
    model = tiny_unet()
    model.compile("adam", mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert isinstance(model.optimizer, mp.LossScaleOptimizer) == wrapped
    model.compile("adam", mc.losses.SparseCategoricalCrossentropy(from_logits=True),
                  auto_scale_loss=False)
    assert not isinstance(model.optimizer, mp.LossScaleOptimizer)


# ============================================================================ the U-Net's ops, low

def rounded(array, low):
    """The float32 values a low-precision array holds."""
    return array.astype(LOW[low]).astype(np.float32)


OPS = {
    "conv 3x3 same": (lambda x, w, b: F.conv2d(x, w, b, padding="same"),
                      [(2, 9, 10, 8), (3, 3, 8, 16), (16,)]),
    "conv 3x3 stride 2": (lambda x, w, b: F.conv2d(x, w, b, strides=2, padding="same"),
                          [(2, 9, 10, 8), (3, 3, 8, 16), (16,)]),
    "conv 1x1 head": (lambda x, w, b: F.conv2d(x, w, b), [(2, 6, 6, 16), (1, 1, 16, 3), (3,)]),
    "transposed 2x2 stride 2": (lambda x, w, b: F.conv2d_transpose(x, w, b, strides=2),
                                [(2, 5, 6, 16), (2, 2, 8, 16), (8,)]),
    "relu": (lambda x: F.relu(x), [(2, 6, 6, 4)]),
    "max pool 2x2": (lambda x: F.max_pool2d(x, pool_size=2), [(2, 6, 6, 4)]),
    "concatenate": (lambda a, b: F.concatenate([a, b], axis=-1), [(2, 6, 6, 4), (2, 6, 6, 3)]),
}


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", list(OPS))
def test_unet_ops_in_low_precision_match_float32(device, low, op, rng):
    """Forward and every input's gradient, in float16 / bfloat16, against float32 computed on
    the same rounded inputs and upstream gradient: within 2 eps of the low precision times the
    largest float32 value (eps: float16 2**-10, bfloat16 2**-7); outputs and gradients keep the
    low dtype."""
    fn, shapes = OPS[op]
    arrays = [rounded(rng.standard_normal(s), low) for s in shapes]
    low_inputs = [Tensor(on(device, a.astype(LOW[low])), requires_grad=True) for a in arrays]
    y = fn(*low_inputs)
    g = rounded(rng.standard_normal(y.shape), low)
    y.backward(on(device, g.astype(LOW[low])))
    ref_inputs = [Tensor(a, requires_grad=True) for a in arrays]
    y_ref = fn(*ref_inputs)
    y_ref.backward(g)
    assert y.dtype == LOW[low] and y.device == device
    tol = 2 * EPS[low]
    error = np.abs(to_numpy(y.data).astype(np.float32) - y_ref.data).max()
    assert error <= tol * np.abs(y_ref.data).max(), f"{op} forward: {error}"
    for i, (mine, ref) in enumerate(zip(low_inputs, ref_inputs)):
        assert mine.grad.dtype == LOW[low], (op, i, mine.grad.dtype)
        error = np.abs(to_numpy(mine.grad).astype(np.float32) - ref.grad).max()
        assert error <= tol * np.abs(ref.grad).max(), f"{op} grad {i}: {error}"


# ============================================================================ training

def segmentation_batch(rng, n=8, size=16):
    x = rng.random((n, size, size, 1)).astype(np.float32)
    y = (x[..., 0] > 0.5).astype(np.int64)
    return x, y


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_tiny_unet_trains_in_mixed_precision_as_in_float32(policy, rng):
    x, y = segmentation_batch(rng)
    runs = {}
    for name in ("float32", policy):
        mp.set_global_policy(name)
        mc.seed(0)
        model = tiny_unet()
        model.compile(mc.optimizers.Adam(1e-2),
                      mc.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["pixel_accuracy"])
        runs[name] = (model, model.fit(x, y, batch_size=4, epochs=6, verbose=0).history)
    model, history = runs[policy]
    _, reference = runs["float32"]
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=0.05)
    assert abs(history["pixel_accuracy"][-1] - reference["pixel_accuracy"][-1]) < 0.05
    assert all(w.dtype == np.float32 for w in model.weights)
    slots = [a for s in model.optimizer._slots for a in s.values()]
    assert slots and all(a.dtype == np.float32 for a in slots)
    assert model.predict(x[:2]).dtype == LOW[mp.DTypePolicy(policy).compute_dtype]
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, mp.LossScaleOptimizer)
        assert model.optimizer.dynamic_scale == 2.0 ** 15          # no overflow, no growth yet
        assert model.optimizer.iterations == 12


def test_float16_overflow_is_skipped_until_the_scale_fits(rng):
    """A scale of 2**28 overflows float16 gradients (max 65504): fit skips those steps,
    halving the scale each time, until the gradients are finite; then it trains."""
    x, y = segmentation_batch(rng)
    mp.set_global_policy("mixed_float16")
    mc.seed(0)
    model = tiny_unet()
    model.compile(mp.LossScaleOptimizer(mc.optimizers.Adam(1e-2), initial_scale=2.0 ** 28),
                  mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = model.get_weights()
    model.fit(x[:4], y[:4], batch_size=4, epochs=1, verbose=0)        # one step: skipped
    assert model.optimizer.iterations == 0 and model.optimizer.dynamic_scale == 2.0 ** 27
    for before, after in zip(first, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    history = model.fit(x, y, batch_size=4, epochs=15, verbose=0).history
    applied = model.optimizer.iterations
    skipped = 30 - applied
    assert skipped >= 1 and applied >= 15
    assert model.optimizer.dynamic_scale == 2.0 ** (27 - skipped)
    assert history["loss"][-1] < 0.8 * history["loss"][0]
