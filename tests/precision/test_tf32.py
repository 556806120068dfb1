"""The TF32 switch (kernels.backend.set_tf32, mc.mixed_precision.enable_tensor_float_32_execution).

On the CPU, CuPy is stood in for by a fake module with CuPy's ``_core._routines_linalg``
compute-type API, which records what the switch asks of it; a GPU case checks the effect itself:
1 + 2**-12 is a float32 number that TF32 (10 mantissa bits) rounds to 1, so a product of 1024
such numbers gives 1024.25 in float32 and 1024 with TF32.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from kernels import backend
from minicnn import mixed_precision as mp

REPO = Path(__file__).resolve().parents[2]


class FakeLinalg(types.ModuleType):
    """cupy._core._routines_linalg's compute-type API: records each set_compute_type call."""
    COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 1, 7

    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def set_compute_type(self, dtype, compute_type):
        self.calls.append((np.dtype(dtype), compute_type))


@pytest.fixture
def fake_cupy(monkeypatch):
    """backend sees an imported 'fakecupy' whose linalg records the compute types."""
    cp = types.ModuleType("fakecupy")
    linalg = FakeLinalg("fakecupy._core._routines_linalg")
    monkeypatch.setitem(sys.modules, "fakecupy._core._routines_linalg", linalg)
    monkeypatch.setattr(backend, "_cupy", cp)
    monkeypatch.setattr(backend, "_tf32", False)
    monkeypatch.setenv("CUPY_TF32", "0")
    return linalg


def test_switch_sets_cupys_cached_compute_type_and_the_variable(fake_cupy):
    backend.set_tf32(True)
    assert backend.tf32_enabled() and mp.tensor_float_32_execution_enabled()
    assert os.environ["CUPY_TF32"] == "1"
    assert fake_cupy.calls[-1] == (np.dtype(np.float32), FakeLinalg.COMPUTE_TYPE_TF32)
    mp.enable_tensor_float_32_execution(False)
    assert not backend.tf32_enabled() and os.environ["CUPY_TF32"] == "0"
    assert fake_cupy.calls[-1] == (np.dtype(np.float32), FakeLinalg.COMPUTE_TYPE_DEFAULT)
    assert len(fake_cupy.calls) == 2


def test_without_the_compute_type_api_only_the_variable_acts(monkeypatch):
    bare = types.ModuleType("barecupy")               # no _core._routines_linalg at all
    monkeypatch.setattr(backend, "_cupy", bare)
    monkeypatch.setattr(backend, "_tf32", False)
    monkeypatch.setenv("CUPY_TF32", "0")
    with pytest.warns(RuntimeWarning, match="CUPY_TF32=1 acts only if no float32 product"):
        backend.set_tf32(True)
    assert os.environ["CUPY_TF32"] == "1" and backend.tf32_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # switching off needs no warning
        backend.set_tf32(False)


def test_cupy_import_applies_the_switch(fake_cupy, monkeypatch):
    """The first import of CuPy sets its compute type from the switch (off by default)."""
    fake = sys.modules["fakecupy._core._routines_linalg"]
    cp = types.ModuleType("fakecupy")
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(backend, "_tf32", True)
    assert backend._import_cupy() is cp
    assert fake.calls[-1] == (np.dtype(np.float32), FakeLinalg.COMPUTE_TYPE_TF32)


@pytest.mark.parametrize("env, expected", [
    ({}, "False"), ({"CUPY_TF32": "1"}, "True"), ({"CUPY_TF32": "0"}, "False"),
    ({"MINICNN_TF32": "1"}, "True"), ({"MINICNN_TF32": "off", "CUPY_TF32": "1"}, "False"),
    ({"MINICNN_TF32": "0", "CUPY_TF32": "1"}, "False"), ({"CUPY_TF32": "x"}, "False")])
def test_initial_switch_from_the_environment(env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("CUPY_TF32", "MINICNN_TF32")}
    done = subprocess.run(
        [sys.executable, "-c", "from kernels import backend; print(backend.tf32_enabled())"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**clean, **env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_tf32_rounds_float32_products_on_a_gpu(device):
    if device != "gpu":
        pytest.skip("TF32 is a GPU (tensor core) mode; the CPU computes float32 products in "
                    "float32 whatever the switch says")
    cp = backend.cupy_module()
    if int(cp.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 needs compute capability 8.0 or newer")
    previous = backend.tf32_enabled()
    a = cp.full((256, 1024), 1 + 2.0 ** -12, dtype=cp.float32)
    b = cp.ones((1024, 256), dtype=cp.float32)
    try:
        backend.set_tf32(False)
        strict = float((a @ b)[0, 0])
        backend.set_tf32(True)
        fast = float((a @ b)[0, 0])
        backend.set_tf32(False)
        again = float((a @ b)[0, 0])
    finally:
        backend.set_tf32(previous)
    assert strict == 1024.25 and again == 1024.25
    assert fast == 1024.0
