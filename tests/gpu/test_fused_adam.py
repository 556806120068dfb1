"""Adam over all weights in one CUDA launch (kernels/cuda/adam.cu) and its NumPy twin.

- the twin (``adam_update_reference``, the kernel's flat-index arithmetic on NumPy) equals
  minicnn's Adam step by step, bit for bit, in float32 and float64, empty and one-element
  weights included;
- ``Adam.step`` dispatches to the fused kernel for GPU arrays (checked on the CPU by standing
  the twin in for the kernel), not for amsgrad or mixed dtypes;
- the wrapper refuses NumPy arrays and mismatched lists;
- on a GPU: the kernel equals the twin (float32 to 1e-6 of the values, float64 to 1e-12; the
  kernel may fuse a multiply-add), repeats exactly, and ``fit`` with Adam runs it and matches
  the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest

import minicnn as mc
from kernels import backend
from kernels.config import settings
from kernels.backend import to_device, to_numpy
from kernels.cuda import adam as fused
from minicnn import optimizers
from minicnn.tensor import Tensor

SHAPES = [(3, 3, 2, 4), (0,), (4,), (1,), (7, 5)]


def weights_and_grads(rng, dtype, steps):
    weights = [Tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return weights, grads


def test_offsets_and_owners_skip_empty_weights():
    offsets = fused.flat_offsets([3, 0, 2, 0])
    np.testing.assert_array_equal(offsets, [0, 3, 3, 5, 5])
    assert offsets.dtype == np.int64
    np.testing.assert_array_equal(fused.owners(offsets, np.arange(5)), [0, 0, 0, 2, 2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", [1e-2, optimizers.ExponentialDecay(3e-2, 2, 0.5)])
def test_twin_equals_minicnn_adam_bit_for_bit(rng, dtype, schedule):
    weights, grads = weights_and_grads(rng, dtype, steps=4)
    opt = optimizers.Adam(schedule, beta_1=0.8, beta_2=0.95, epsilon=1e-6)
    w_twin = [w.data.copy() for w in weights]
    m_twin = [np.zeros_like(w) for w in w_twin]
    v_twin = [np.zeros_like(w) for w in w_twin]
    for step, g in enumerate(grads):
        lr = opt.learning_rate
        for w, gi in zip(weights, g):
            w.grad = gi
        opt.step(weights)
        fused.adam_update_reference(w_twin, g, m_twin, v_twin, lr, 0.8, 0.95, 1e-6, step + 1)
        for k, w in enumerate(weights):
            np.testing.assert_array_equal(w_twin[k], w.data)
            np.testing.assert_array_equal(m_twin[k], opt._slots[k]["momentum"])
            np.testing.assert_array_equal(v_twin[k], opt._slots[k]["velocity"])
    assert w_twin[0].dtype == dtype


@pytest.fixture
def fused_on_the_cpu(monkeypatch):
    """Adam sees 'GPU arrays' (the CUDA kernels on) and runs the twin where the kernel would."""
    calls = []

    class GpuLooking:                       # the optimizers' view of kernels.backend
        def __getattr__(self, name):
            return getattr(backend, name)

        @staticmethod
        def is_gpu_array(array):
            return True
    monkeypatch.setattr(optimizers, "backend", GpuLooking())
    monkeypatch.setattr(settings, "cuda_kernels", True)     # restored after the test

    def twin(weights, grads, ms, vs, lr, beta_1, beta_2, epsilon, t):
        calls.append((len(weights), t))
        fused.adam_update_reference(weights, grads, ms, vs, lr, beta_1, beta_2, epsilon, t)
    monkeypatch.setattr(fused, "adam_update_gpu", twin)
    return calls


def test_adam_dispatches_to_the_fused_kernel(fused_on_the_cpu, rng):
    weights, grads = weights_and_grads(rng, np.float32, steps=3)
    plain = [Tensor(w.data.copy(), requires_grad=True) for w in weights]
    opt, reference = optimizers.Adam(1e-2), optimizers.Adam(1e-2)
    for g in grads:
        for w, p, gi in zip(weights, plain, g):
            w.grad, p.grad = gi, gi
        opt.step(weights)
        with settings.override(cuda_kernels=False):      # the per-weight update
            reference.step(plain)
    assert fused_on_the_cpu == [(5, 1), (5, 2), (5, 3)]
    for w, p in zip(weights, plain):
        np.testing.assert_array_equal(w.data, p.data)


def test_adam_keeps_the_per_weight_update_where_the_kernel_does_not_apply(fused_on_the_cpu, rng):
    weights, grads = weights_and_grads(rng, np.float32, steps=1)
    for w, g in zip(weights, grads[0]):
        w.grad = g
    optimizers.Adam(amsgrad=True).step(weights)                      # no amsgrad kernel
    wide = Tensor(np.zeros(3, np.float64), requires_grad=True)       # two dtypes in one step
    wide.grad = np.ones(3)
    optimizers.Adam().step(weights[:1] + [wide])
    assert fused_on_the_cpu == []
    optimizers.Adam().step(weights)
    assert fused_on_the_cpu == [(5, 1)]


def test_wrapper_checks_its_arguments(rng):
    w = [np.zeros(3, np.float32)]
    with pytest.raises(TypeError, match="must be a CuPy array"):
        fused.adam_update_gpu(w, w, w, w, 1e-3, 0.9, 0.999, 1e-7, 1)
    with pytest.raises(ValueError, match="non-empty lists of one length"):
        fused.adam_update_gpu(w, w + w, w, w, 1e-3, 0.9, 0.999, 1e-7, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        fused.adam_update_reference(w, [np.zeros(4, np.float32)], w, w, 1e-3, 0.9, 0.999,
                                    1e-7, 1)
    with pytest.raises(TypeError, match="all arrays must be float32"):
        fused.adam_update_reference(w, [np.zeros(3)], w, w, 1e-3, 0.9, 0.999, 1e-7, 1)


# ============================================================================ on a GPU

def gpu_only(device):
    if device != "gpu":
        pytest.skip("the fused Adam kernel takes CuPy arrays; its NumPy twin is tested above")


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_kernel_equals_the_twin(device, rng, dtype, rtol):
    gpu_only(device)
    shapes = SHAPES + [(300, 257), (2,)]           # more elements than one block holds
    host = {name: [rng.standard_normal(s).astype(dtype) for s in shapes]
            for name in ("w", "g", "m")}
    host["v"] = [rng.random(s).astype(dtype) for s in shapes]
    gpu = {name: [to_device(a.copy(), device) for a in arrays] for name, arrays in host.items()}
    for t in (1, 2, 3):
        fused.adam_update_reference(host["w"], host["g"], host["m"], host["v"], 1e-2, 0.9,
                                    0.999, 1e-7, t)
        fused.adam_update_gpu(gpu["w"], gpu["g"], gpu["m"], gpu["v"], 1e-2, 0.9, 0.999, 1e-7, t)
    for name in ("w", "m", "v"):
        for k, (mine, ref) in enumerate(zip(gpu[name], host[name])):
            np.testing.assert_allclose(to_numpy(mine), ref, rtol=rtol,
                                       atol=rtol * float(np.abs(ref).max(initial=0.0)),
                                       err_msg=f"{name}[{k}]")


def test_kernel_repeats_exactly(device, rng):
    gpu_only(device)
    runs = []
    for _ in range(2):
        arrays = [[to_device(rng2, device) for rng2 in
                   np.random.default_rng(3).standard_normal((4, 1000)).astype(np.float32)]
                  for _ in range(4)]
        fused.adam_update_gpu(*arrays, 1e-3, 0.9, 0.999, 1e-7, 5)
        runs.append([to_numpy(a) for a in arrays[0]])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_fit_with_adam_on_the_gpu_runs_the_kernel_and_matches_the_cpu(device, rng, monkeypatch):
    gpu_only(device)
    launches = []
    real = fused.adam_update_gpu
    monkeypatch.setattr(fused, "adam_update_gpu",
                        lambda *args: launches.append(len(args[0])) or real(*args))
    x = rng.standard_normal((6, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, (6, 8, 8))
    histories, models = [], []
    for where in ("cpu", "gpu"):
        mc.seed(3)
        model = mc.models.UNet(num_classes=3, base_filters=4, depth=1)
        model.build((None, 8, 8, 2))
        model.to(where)
        model.compile(optimizers.Adam(1e-3), mc.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        histories.append(model.fit(x, y, batch_size=3, epochs=2, shuffle=False,
                                   verbose=0).history["loss"])
        models.append(model)
    assert launches == [len(models[1].trainable_weights)] * 4
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-4)
    for mine, ref in zip(models[1].get_weights(), models[0].get_weights()):
        np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=1e-4)
