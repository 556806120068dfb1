"""minicnn: a readable deep-learning engine for convolutional networks, on NumPy and CuPy."""
from kernels.backend import gpu_available, to_device  # noqa: F401
from kernels.config import settings as config  # noqa: F401  (the kernels' runtime settings)
from minicnn.tensor import Function, Tensor, no_grad  # noqa: F401
from minicnn.gradcheck import GradcheckError, gradcheck  # noqa: F401
from minicnn.rng import seed  # noqa: F401
from minicnn import (  # noqa: F401
    callbacks, distributed, functions, initializers, io, layers, losses, metrics, mixed_precision,
    models, optimizers, segmentation, training)
from minicnn.models import Model, Sequential  # noqa: F401

__version__ = "0.1.0"
