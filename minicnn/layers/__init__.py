"""Keras-named layers: ``from minicnn import layers as kl; kl.Conv2D(4, (5, 5))(x)``."""
from minicnn.layers.base import Input, Layer, SymbolicTensor  # noqa: F401
from minicnn.layers.conv import (  # noqa: F401
    Conv2D, Conv2DTranspose, Cropping2D, DepthwiseConv2D, SeparableConv2D,
    SpatialSeparableConv2D, ZeroPadding2D)
from minicnn.layers.core import (  # noqa: F401
    Activation, Add, Concatenate, Dense, Dropout, Flatten, LeakyReLU, ReLU, Softmax)
from minicnn.layers.normalization import BatchNormalization  # noqa: F401
from minicnn.layers.pooling import (  # noqa: F401
    AveragePooling2D, GlobalAveragePooling2D, MaxPooling2D, UpSampling2D)
