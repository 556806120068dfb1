"""kernels.dispatch: the one place that picks plain, tuned CPU or CUDA; every twin takes its plain
kernel's arguments; mc.config forces the plain path; importing does not import CuPy."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels import dispatch
from kernels.config import settings

REPO = Path(__file__).resolve().parents[2]


class FakeGpuArray(np.ndarray):
    """A NumPy array that ``kernels.backend.is_gpu_array`` takes for a CuPy one."""


FakeGpuArray.__module__ = "cupy._stand_in"


def gpu(a):
    return np.asarray(a).view(FakeGpuArray)


KERNELS = sorted(dispatch.KERNELS.items())


def test_every_kernel_with_a_twin_is_listed():
    assert {"conv2d_forward", "conv2d_transpose", "conv2d_backward_filter", "bias_gradient",
            "max_pool2d_forward", "batch_norm_forward_training", "relu_forward", "concatenate",
            "sparse_categorical_crossentropy_forward"} <= set(dispatch.KERNELS)
    for name, fn in KERNELS:
        assert fn.twins.fast is not None or fn.twins.cuda is not None, name


@pytest.mark.parametrize("name, fn", KERNELS, ids=[k for k, _ in KERNELS])
def test_the_dispatched_function_reads_like_its_plain_kernel(name, fn):
    plain = fn.twins.plain
    assert fn.__name__ == plain.__name__ == name and fn.__doc__ == plain.__doc__
    assert inspect.signature(fn) == inspect.signature(plain)


@pytest.mark.parametrize("name, fn", KERNELS, ids=[k for k, _ in KERNELS])
def test_every_twin_takes_its_plain_kernels_arguments(name, fn):
    """Same positional arrays (names, order, defaults) and the same keyword-only settings (names
    and defaults); a twin may add keyword-only settings of its own, with defaults."""
    plain = inspect.signature(fn.twins.plain).parameters
    for twin in (fn.twins.fast, fn.twins.cuda):
        if twin is None:
            continue
        params = inspect.signature(twin).parameters
        for p in plain.values():
            assert p.name in params, (name, twin.__name__, p.name)
            q = params[p.name]
            assert (q.kind, q.default) == (p.kind, p.default), (name, twin.__name__, p.name)
        assert list(params)[:len(plain)] == list(plain), (name, twin.__name__)
        for extra in list(params)[len(plain):]:
            assert params[extra].kind is inspect.Parameter.KEYWORD_ONLY, (name, extra)
            assert params[extra].default is not inspect.Parameter.empty, (name, extra)


@pytest.mark.parametrize("name, fn", KERNELS, ids=[k for k, _ in KERNELS])
def test_the_choice(name, fn):
    """NumPy: tuned where there is a twin; CuPy: CUDA where there is one and cuda_kernels is on;
    kernels="plain": the plain kernel everywhere."""
    twins = fn.twins
    cpu_args, gpu_args = (np.zeros(3),), (gpu(np.zeros(3)),)
    kwargs = {"from_logits": True} if "crossentropy_forward" in name else {}
    if "crossentropy_backward" in name:
        cpu_args, gpu_args = (np.zeros(3), (True,)), (gpu(np.zeros(3)), (True,))
    with settings.override(kernels="fast", cuda_kernels=True):
        assert dispatch.implementation(twins, cpu_args, kwargs) is (twins.fast or twins.plain)
        assert dispatch.implementation(twins, gpu_args, kwargs) is (twins.cuda or twins.plain)
    with settings.override(kernels="fast", cuda_kernels=False):
        assert dispatch.implementation(twins, gpu_args, kwargs) is twins.plain
    with settings.override(kernels="plain", cuda_kernels=True):
        for args in (cpu_args, gpu_args):
            assert dispatch.implementation(twins, args, kwargs) is twins.plain


def test_the_cuda_cross_entropy_covers_logits_only():
    forward = dispatch.sparse_categorical_crossentropy_forward.twins
    backward = dispatch.sparse_categorical_crossentropy_backward.twins
    labels, probabilities = gpu(np.zeros(3, np.int64)), gpu(np.full((3, 2), 0.5))
    with settings.override(kernels="fast", cuda_kernels=True):
        assert dispatch.implementation(forward, (labels, probabilities),
                                       {"from_logits": False}) is forward.plain
        assert dispatch.implementation(backward, (gpu(np.ones(3)), (False, labels)), {}) \
            is backward.plain
        # the saved state alone may carry the device (a Python float as the gradient)
        assert dispatch.implementation(backward, (1.0, (True, labels)), {}) is backward.cuda


def test_a_call_runs_the_chosen_implementation(rng):
    """Through the dispatch, the tuned and the plain convolution give the same values."""
    x, w = rng.standard_normal((2, 9, 9, 8)), rng.standard_normal((3, 3, 8, 4))
    fast = dispatch.conv2d_forward(x, w, padding="same")
    with settings.override(kernels="plain"):
        plain = dispatch.conv2d_forward(x, w, padding="same")
    np.testing.assert_allclose(fast, plain, rtol=1e-12, atol=1e-12)


def test_importing_does_not_import_cupy_and_the_cuda_switch_reads_the_environment():
    code = ("import sys, kernels.dispatch, minicnn as mc\n"
            "assert 'cupy' not in sys.modules and 'cupyx' not in sys.modules, 'cupy imported'\n"
            "print(mc.config.cuda_kernels)\n")
    for value, expected in (("1", "True"), ("0", "False"), ("off", "False")):
        env = {**os.environ, "MINICNN_CUDA_KERNELS": value,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected, (value, done.stdout)


def test_the_plain_kernels_import_neither_threads_nor_cuda():
    """The readable files stand alone: no kernels.fast, no kernels.cuda, no kernels.config."""
    for path in sorted((REPO / "kernels").glob("*.py")):
        if path.name in ("dispatch.py", "config.py", "backend.py", "__init__.py"):
            continue
        text = path.read_text()
        for name in ("kernels.fast", "kernels.cuda", "kernels.config", "from kernels import cuda",
                     "threading", "parallel_map"):
            assert name not in text, (path.name, name)
