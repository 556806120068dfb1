"""Differentiable functions: each a ``minicnn.Function`` over the kernels."""
from minicnn.functions.math import (  # noqa: F401
    add, concatenate, div, exp, log, matmul, mean, mul, neg, pad, power, reshape, sqrt, stack,
    sub, transpose)
