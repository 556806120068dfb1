"""Keras-named layers: ``from minicnn import layers as kl; kl.Conv2D(4, (5, 5))(x)``."""
from minicnn.layers.base import Input, Layer, SymbolicTensor  # noqa: F401
