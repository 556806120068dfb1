"""The distributed tests seed minicnn's generator: give the rest of the suite back the
generator (and NumPy's legacy state) it had, so the order of test files changes nothing."""
import numpy as np
import pytest

from minicnn import rng as package_rng


@pytest.fixture(scope="module", autouse=True)
def restore_random_state():
    generator, legacy = package_rng._generator, np.random.get_state()
    yield
    package_rng._generator = generator
    np.random.set_state(legacy)
