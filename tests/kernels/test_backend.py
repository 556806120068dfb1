"""kernels.backend: the one array-module switch."""
import numpy as np
import pytest

from kernels import backend


def test_numpy_arrays_use_numpy():
    assert backend.get_array_module(np.zeros(2), 3.0) is np
    assert backend.device_of(np.zeros(2)) == "cpu"
    a = np.arange(3.0)
    assert backend.to_device(a, "cpu") is a


def test_unknown_device_name():
    with pytest.raises(ValueError, match="'cpu', 'gpu' or 'auto'"):
        backend.check_device("tpu")


def test_default_device_from_environment(monkeypatch):
    monkeypatch.setenv("MINICNN_DEVICE", "cpu")
    assert backend.default_device() == "cpu"
    monkeypatch.setenv("MINICNN_DEVICE", "quantum")
    with pytest.raises(ValueError, match="quantum"):
        backend.default_device()


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
def test_gpu_request_without_gpu_says_what_is_missing():
    with pytest.raises(RuntimeError, match="cupy-cuda12x|no CUDA device"):
        backend.to_device(np.zeros(2), "gpu")
    assert backend.check_device("auto") == "cpu"
