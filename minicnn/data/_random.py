"""Where the data pipeline's randomness comes from: one NumPy Generator per call site."""
from __future__ import annotations

import numpy as np

from minicnn import rng as package_rng


def as_generator(seed=None) -> np.random.Generator:
    """A NumPy Generator for ``seed``.

    seed: None -> the package generator ``minicnn.rng.generator()`` (so ``minicnn.seed(n)``
    makes a run repeat); an int (or SeedSequence) -> ``np.random.default_rng(seed)``;
    a Generator -> itself.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return package_rng.generator()
    if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer, np.random.SeedSequence)):
        raise TypeError(f"seed must be None, an int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(seed)
