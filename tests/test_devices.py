"""The GPU path, wired on the CPU side (which kernel runs where is tests/kernels/test_dispatch.py).

- the kernels reached through ``kernels.dispatch`` give the NumPy path's tuple structure, dtypes
  and values on the ``device`` fixture (on a GPU, "gpu" runs the CUDA twins; without one it is
  skipped), and the CUDA twins agree with the plain array code on the same CuPy arrays;
- the scatter-add, the metrics' fixed-size counts, the dropout generators, ``Tensor.to`` and a
  whole fit on the device.
"""
from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest

import minicnn as mc
from kernels import backend, dispatch, pooling
from kernels.config import settings
from kernels.backend import to_device, to_numpy
from minicnn import layers as kl
from minicnn import metrics
from minicnn.functions import activations as A
from minicnn.functions import math as M
from minicnn.tensor import Tensor


class NumpyInDisguise(types.ModuleType):
    """An array module that is not ``numpy`` but forwards every name to it."""

    def __getattr__(self, name):
        return getattr(np, name)


DISGUISE = NumpyInDisguise("cupy_stand_in")


def images(rng, shape=(2, 5, 6, 3), dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def logits_and_labels(rng, shape=(2, 3, 4), classes=3, dtype=np.float32):
    return (rng.standard_normal(shape + (classes,)).astype(dtype),
            rng.integers(0, classes, shape).astype(np.int64))


# ======================================================================== same results on a device

def assert_same_structure(actual, expected, rtol, what):
    """Same tuple structure (None where None), shapes and dtypes; values to rtol."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_structure(a, e, rtol, f"{what}[{i}]")
        return
    if expected is None or isinstance(expected, (bool, np.bool_)):
        assert actual == expected, what
        return
    a = to_numpy(actual)
    assert a.shape == expected.shape and a.dtype == expected.dtype, (what, a.dtype, a.shape)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    np.testing.assert_allclose(a, expected, rtol=0, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dispatched_kernels_return_what_numpy_returns(device, rng, dtype):
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    x = images(rng, (2, 7, 6, 4), dtype)
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
    logits, labels = logits_and_labels(rng, dtype=dtype)
    valid = rng.random(labels.shape) > 0.3
    weight = rng.uniform(0.5, 2, 3).astype(dtype)
    w, b = images(rng, (3, 3, 4, 2), dtype), images(rng, (2,), dtype)
    w_t = images(rng, (3, 3, 2, 4), dtype)
    d = (lambda a: None if a is None else to_device(a, device))
    cases = [
        ("max pool", dispatch.max_pool2d_forward, (x,), dict(pool_size=3, strides=2,
                                                             padding="same")),
        ("max pool y only", dispatch.max_pool2d_forward, (x,), dict(return_argmax=False)),
        ("upsample nearest", dispatch.upsample2d_forward, (x,), dict(size=(2, 3))),
        ("upsample bilinear", dispatch.upsample2d_forward, (x,),
         dict(size=2, interpolation="bilinear")),
        ("upsample backward", dispatch.upsample2d_backward, (x,),
         dict(size=(1, 2), interpolation="bilinear")),
        ("bn train", dispatch.batch_norm_forward_training, (x, gamma, beta), dict(epsilon=1e-3)),
        ("bn inference", dispatch.batch_norm_forward_inference, (x, gamma, gamma + 1, gamma, beta),
         dict(epsilon=1e-3)),
        ("ce forward", dispatch.sparse_categorical_crossentropy_forward,
         (labels, logits, weight, valid), dict(from_logits=True)),
        ("conv", dispatch.conv2d_forward, (x, w, b), dict(strides=(2, 1), padding="same")),
        ("conv dx", dispatch.conv2d_transpose, (x, w_t), dict(output_size=(13, 6),
                                                              strides=(2, 1), padding="same")),
        ("conv dw", dispatch.conv2d_backward_filter, (x, x[:, :, :, :1]),
         dict(kernel_size=(3, 3), padding="same")),
    ]
    for what, fn, args, kwargs in cases:
        expected = fn(*args, **kwargs)
        actual = fn(*(d(a) if isinstance(a, np.ndarray) else a for a in args), **kwargs)
        if what == "ce forward":          # the saved labels may be int32 on the GPU
            (values, saved), (values_np, saved_np) = actual, expected
            assert_same_structure(values, values_np, rtol, what)
            assert len(saved) == len(saved_np) and saved[0] is True and saved[3:5] == (None, None)
            np.testing.assert_array_equal(to_numpy(saved[1]), saved_np[1])
            # the saved softmax of ignored positions is a don't-care (their weight is 0): NumPy
            # keeps a uniform row there, the CUDA kernel the real softmax
            kept = saved_np[5] != 0
            assert_same_structure(to_numpy(saved[2])[kept], saved_np[2][kept], rtol,
                                  what + " softmax")
            assert_same_structure(saved[5], saved_np[5], rtol, what + " weight")
            dz = dispatch.sparse_categorical_crossentropy_backward(d(values_np), saved)
            dz_np = dispatch.sparse_categorical_crossentropy_backward(values_np, saved_np)
            assert_same_structure(dz, dz_np, rtol, "ce backward")
        else:
            assert_same_structure(actual, expected, rtol, what)
    _, _, _, centered, inv_std = dispatch.batch_norm_forward_training(x, gamma, beta)
    dy = images(rng, x.shape, dtype)
    expected = dispatch.batch_norm_backward(dy, centered, inv_std, gamma)
    actual = dispatch.batch_norm_backward(d(dy), d(centered), d(inv_std), d(gamma))
    assert_same_structure(actual, expected, rtol, "bn backward")
    y_ref, argmax_ref = pooling.max_pool2d_reference(x, pool_size=3, strides=2, padding="same")
    y, argmax = dispatch.max_pool2d_forward(d(x), pool_size=3, strides=2, padding="same")
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(argmax), argmax_ref)


def test_cuda_kernels_and_array_code_agree(device, rng):
    """On a GPU: the CUDA twins against the plain array code run on the same CuPy arrays."""
    x = to_device(images(rng, (2, 6, 6, 3)), device)
    w = to_device(images(rng, (3, 3, 3, 2)), device)

    def run():
        return (dispatch.max_pool2d_forward(x), dispatch.conv2d_forward(x, w, padding="same"),
                dispatch.upsample2d_forward(x, size=2, interpolation="bilinear"),
                dispatch.batch_norm_forward_training(x)[0])
    with settings.override(cuda_kernels=False):
        twin = run()
    mine = run()
    for a, b in zip(mine, twin):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert backend.device_of(u) == device
            np.testing.assert_allclose(to_numpy(u), to_numpy(v), rtol=1e-4, atol=1e-5)


# ========================================================================== scatter-add and counts

def test_scatter_add_adds_every_repeat(device):
    target = to_device(np.zeros((3, 4)), device)
    rows, columns = to_device(np.array([0, 2, 0, 0]), device), to_device(np.array([1, 3, 1, 1]),
                                                                         device)
    backend.scatter_add(target, (rows, columns), to_device(np.array([1.0, 2.0, 3.0, 4.0]), device))
    expected = np.zeros((3, 4))
    expected[0, 1], expected[2, 3] = 8.0, 2.0
    np.testing.assert_array_equal(to_numpy(target), expected)


def test_getitem_gradient_counts_repeated_indices(device):
    x = Tensor(to_device(np.arange(5.0), device), requires_grad=True)
    index = np.array([4, 0, 4, 4, 1])
    y = x[index]
    np.testing.assert_array_equal(to_numpy(y.data), [4.0, 0.0, 4.0, 4.0, 1.0])
    (y * Tensor(to_device(np.arange(1.0, 6.0), device))).sum().backward()
    assert backend.device_of(x.grad) == device
    np.testing.assert_array_equal(to_numpy(x.grad), [2.0, 5.0, 0.0, 0.0, 1.0 + 3.0 + 4.0])


@pytest.mark.parametrize("weighted", [False, True])
def test_pair_counts_fixed_size_path_equals_bincount(monkeypatch, rng, weighted):
    """The CuPy branch (zeros + scatter-add), run on NumPy in disguise, against np.bincount."""
    index = rng.integers(0, 7, 50)
    weights = rng.random(50) if weighted else None
    expected = np.bincount(index, weights=weights, minlength=9).astype(np.float64)
    np.testing.assert_array_equal(metrics.pair_counts(index, weights, 9), expected)
    monkeypatch.setattr(backend, "get_array_module", lambda *arrays: DISGUISE)
    counts = metrics.pair_counts(index, weights, 9)
    assert counts.dtype == np.float64 and counts.shape == (9,)
    np.testing.assert_allclose(counts, expected, rtol=1e-12)


def test_mean_iou_accumulates_on_the_device(device):
    true = np.array([[0, 1, 2, 2], [1, 1, 0, 2]])
    pred = np.array([[0, 1, 1, 2], [1, 0, 0, 2]])
    scores = np.eye(3, dtype=np.float32)[pred]
    m = metrics.MeanIoU(num_classes=3)
    m.update_state(true, to_device(scores, device))
    m.update_state(to_device(true, device), Tensor(to_device(scores, device)))
    assert backend.device_of(m._cm) == device
    cm = np.zeros((3, 3))
    np.add.at(cm, (true.ravel(), pred.ravel()), 2)
    np.testing.assert_array_equal(m.confusion_matrix(), cm)
    tp = np.diag(cm)
    iou = tp / (cm.sum(0) + cm.sum(1) - tp)
    assert m.result() == pytest.approx(iou.mean(), rel=1e-6)


# ============================================================================ dropout generators

class FakeGpuArray:
    """Looks like a CuPy array to ``backend.is_gpu_array`` (its class lives in 'cupy...')."""

    shape = (2, 3)


FakeGpuArray.__module__ = "cupy._stand_in"


def test_dropout_generator_is_the_numpy_one_on_the_cpu():
    generator = np.random.default_rng(0)
    assert A.device_generator_for(generator, np.zeros(3)) is generator


def test_gpu_dropout_generator_is_seeded_once_per_numpy_generator(monkeypatch):
    made = []
    monkeypatch.setattr(backend, "device_generator",
                        lambda seed: made.append(seed) or types.SimpleNamespace(seed=seed))
    monkeypatch.setattr(A, "DEVICE_GENERATORS", {})
    like = FakeGpuArray()
    mc.seed(7)
    first = A.device_generator_for(mc.rng.generator(), like)
    assert A.device_generator_for(mc.rng.generator(), like) is first       # reused
    expected_seed = int(np.random.default_rng(7).integers(2**63))
    assert made == [expected_seed]                    # one draw from the package generator
    mc.seed(7)                                        # a new package generator: same seed again
    again = A.device_generator_for(mc.rng.generator(), like)
    assert again is not first and again.seed == first.seed
    other = A.device_generator_for(np.random.default_rng(8), like)
    assert other.seed != first.seed
    for i in range(40):                               # dropout(seed=...) makes one per call
        A.device_generator_for(np.random.default_rng(i), like)
    assert len(A.DEVICE_GENERATORS) == A.MAX_DEVICE_GENERATORS
    gpu_twin = types.SimpleNamespace(random=None)     # not a NumPy Generator: used as it is
    assert A.device_generator_for(gpu_twin, like) is gpu_twin


def test_dropout_repeats_under_seed_on_the_device(device):
    x = Tensor(to_device(np.ones((4, 8, 8, 3), np.float32), device), requires_grad=True)
    outputs = []
    for _ in range(2):
        mc.seed(11)
        y = A.dropout(x, rate=0.25)
        assert backend.device_of(y.data) == device and y.dtype == np.float32
        outputs.append(to_numpy(y.data))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert np.isin(outputs[0], [0.0, np.float32(1 / 0.75)]).all()
    assert 0.1 < np.mean(outputs[0] == 0) < 0.4
    y.sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), outputs[1])


# ========================================================================= Tensor.to and constants

def test_to_keeps_leaves_and_differentiates_computed_tensors(device):
    w = Tensor(np.arange(3.0), requires_grad=True, name="w")
    moved = w.to(device)
    assert moved.device == device and moved.requires_grad and moved.name == "w"
    assert (moved is w) == (device == "cpu") and moved.creator is None
    y = w * 3.0                                       # computed on the CPU
    z = y.to(device)
    assert z.device == device
    (z * z).sum().backward()                          # d/dw sum (3w)^2 = 18 w
    assert backend.device_of(w.grad) == "cpu"
    np.testing.assert_allclose(w.grad, 18 * np.arange(3.0))


def test_to_device_function_is_differentiable_on_one_device():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    y = M.to_device(x * 2.0, "cpu")
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])
    with pytest.raises(ValueError, match="'cpu', 'gpu' or 'auto'"):
        M.to_device(x, "tpu")


def test_numbers_and_numpy_scalars_follow_the_tensor(device):
    x = Tensor(to_device(np.array([1.0, 2.0], np.float32), device))
    assert (x * 2).dtype == np.float32 and (x * 2).device == device
    half = x / np.float32(2)
    assert half.device == device and half.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(half.data), [0.5, 1.0])
    wide = x * np.float64(2)                         # promotion is the array module's own
    assert wide.device == device
    if device == "cpu":
        assert wide.dtype == (np.array([1.0], np.float32) * np.float64(2)).dtype
    assert (2 - x).device == device
    np.testing.assert_array_equal(to_numpy((2 - x).data), [1.0, 0.0])
    mixing = pytest.raises(ValueError, match="different devices") if device == "gpu" else \
        contextlib.nullcontext()
    with mixing:
        x + np.ones(2, np.float32)                   # a host array stays on the host


def test_numpy_copies_once():
    data = np.arange(4.0)
    t = Tensor(data)
    host = t.numpy()
    assert host is not data and np.shares_memory(host, data) is False
    np.testing.assert_array_equal(host, data)


# ========================================================================= a whole fit on a device

def tiny_model():
    inputs = kl.Input((8, 8, 2))
    h = kl.Conv2D(4, 3, padding="same")(inputs)
    h = kl.BatchNormalization()(h)
    h = kl.ReLU()(h)
    h = kl.MaxPooling2D(2)(h)
    h = kl.UpSampling2D(2, interpolation="bilinear")(h)
    model = mc.Model(inputs, kl.Conv2D(3, 1)(h))
    model.compile(mc.optimizers.SGD(0.1, momentum=0.9),    # SGD: no Adam-amplified noise on
                  mc.losses.SparseCategoricalCrossentropy(from_logits=True),  # the pre-BN bias
                  metrics=["pixel_accuracy", "mean_iou"])
    return model


def test_fit_on_a_device_matches_the_cpu_and_moves_back(device, rng):
    x = rng.standard_normal((6, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, (6, 8, 8))
    mc.seed(3)
    cpu_model = tiny_model()
    mc.seed(3)
    model = tiny_model().to(device)
    assert all(w.device == device for w in model.weights)
    runs = [m.fit(x, y, batch_size=3, epochs=2, shuffle=False, verbose=0)
            for m in (cpu_model, model)]
    assert all(w.device == device for w in model.weights)
    slots = [a for s in model.optimizer._slots for a in s.values()]
    assert slots and all(backend.device_of(a) == device for a in slots)
    np.testing.assert_allclose(runs[1].history["loss"], runs[0].history["loss"], rtol=1e-4)
    for key in ("pixel_accuracy", "mean_iou"):       # a near-tie may flip a pixel's argmax
        np.testing.assert_allclose(runs[1].history[key], runs[0].history[key], atol=0.02,
                                   err_msg=key)
    for mine, ref in zip(model.get_weights(), cpu_model.get_weights()):
        np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=1e-4)
    logs = model.evaluate(x, y, batch_size=4, return_dict=True)
    ref = cpu_model.evaluate(x, y, batch_size=4, return_dict=True)
    assert logs["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    np.testing.assert_allclose(model.predict(x, batch_size=4), cpu_model.predict(x),
                               rtol=1e-3, atol=1e-4)

    model.to("cpu")                                   # back: the optimizer slots follow
    model.fit(x, y, batch_size=3, epochs=1, shuffle=False, verbose=0)
    slots = [a for s in model.optimizer._slots for a in s.values()]
    assert all(isinstance(a, np.ndarray) for a in slots + [w.data for w in model.weights])


def test_evaluate_sums_batch_losses_in_float64(rng):
    x = rng.standard_normal((5, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, (5, 8, 8))
    mc.seed(4)
    model = tiny_model()
    logs = model.evaluate(x, y, batch_size=2, return_dict=True)
    loss_fn = model.loss
    total = 0.0
    with mc.no_grad():
        for start in range(0, 5, 2):
            batch = slice(start, start + 2)
            total += float(loss_fn(y[batch], model(x[batch])).data) * len(x[batch])
    assert logs["loss"] == total / 5
