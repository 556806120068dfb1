"""Joining arrays (the U-Net's skip connections): ``concatenate(*arrays, axis=...)``.

The plain kernel is NumPy's (or CuPy's) own join; the tuned CPU twin in ``kernels/fast/arrays.py``
copies large batches in groups of images on the threads.
"""
from __future__ import annotations

from kernels.backend import get_array_module


def concatenate(*arrays, axis=-1):
    """The arrays joined along ``axis``: equal shapes elsewhere, NumPy's dtype promotion."""
    return get_array_module(*arrays).concatenate(arrays, axis=axis)
