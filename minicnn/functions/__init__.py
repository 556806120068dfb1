"""Differentiable functions: each a ``minicnn.Function`` over the kernels."""
from minicnn.functions.activations import (  # noqa: F401
    dropout, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh)
from minicnn.functions.conv import (  # noqa: F401
    conv2d, conv2d_transpose, crop2d, depthwise_conv2d, pad2d, separable_conv2d)
from minicnn.functions.math import (  # noqa: F401
    add, concatenate, div, exp, log, matmul, mean, mul, neg, pad, power, reshape, sqrt, stack,
    sub, transpose)
from minicnn.functions.normalization import batch_norm, batch_norm_relu  # noqa: F401
from minicnn.functions.pooling import (  # noqa: F401
    avg_pool2d, global_avg_pool2d, max_pool2d, upsample2d)
