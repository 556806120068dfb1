"""The package's random numbers: one NumPy Generator, reset by ``minicnn.seed(n)``.

Initializers, dropout, shuffling and augmentation draw from ``generator()``, so one call to
``seed(n)`` makes a CPU run repeat exactly.
"""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng()


def seed(n: int) -> None:
    """Reset the package generator (and NumPy's legacy global one) to seed ``n``."""
    global _generator
    _generator = np.random.default_rng(n)
    np.random.seed(n % 2**32)


def generator() -> np.random.Generator:
    """The package's current generator."""
    return _generator

