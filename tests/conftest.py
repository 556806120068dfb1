"""Shared test settings: hypothesis profiles sized for two CPU cores, float tolerances."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng():
    """A fresh, fixed-seed NumPy generator for each test."""
    return np.random.default_rng(1234)


@pytest.fixture(params=["cpu", "gpu"])
def device(request):
    """Run a kernel or layer test on NumPy and, where CuPy sees a GPU, on CuPy too."""
    from kernels import backend
    if request.param == "gpu" and not backend.gpu_available():
        pytest.skip("no CUDA GPU visible to CuPy (GPU twin of a CPU test)")
    return request.param


@pytest.fixture(params=["plain", "fast"])
def kernel_path(request):
    """Run a test through the plain kernels and through their tuned twins (``mc.config.kernels``;
    with the ``device`` fixture's "gpu", "fast" means the CUDA twins)."""
    from kernels.config import settings
    with settings.override(kernels=request.param):
        yield request.param
