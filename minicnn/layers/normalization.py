"""BatchNormalization with Keras 3's arguments, defaults and weight order.

    x: (..., C) (channels on ``axis``, the last by default), e.g. (N, H, W, C); weights (C,):
    gamma, beta (trainable), moving_mean, moving_variance (not trainable), in that order.

    training=True (and the layer trainable):
        y = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta     (batch mean, biased variance)
        moving_mean     <- moving_mean * momentum + mean_B * (1 - momentum)
        moving_variance <- moving_variance * momentum + var_B * (1 - momentum)
    otherwise:
        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta

Keras' defaults (momentum 0.99, epsilon 1e-3) differ from PyTorch's BatchNorm2d (momentum 0.1 on
the other side of the average, eps 1e-5, unbiased variance in the running estimate). As in Keras,
a frozen layer (trainable=False) normalises with its moving statistics even when training=True.
``synchronized=True`` (Keras 3's argument): under ``mpiexec``, mean_B and var_B are taken over
the global batch of every rank (``minicnn.distributed.SyncBatchNorm``); on one process it is
the plain layer.
"""
from __future__ import annotations

from kernels.normalization import update_moving_statistics
from minicnn import mixed_precision
from minicnn.functions import activations as A
from minicnn.functions import math as M
from minicnn.functions.normalization import BatchNorm, BatchNormReLU, _constant_or, batch_norm
from minicnn.layers.base import Layer, format_shape
from minicnn.layers.core import ReLU, initializer_config


class BatchNormalization(Layer):
    """Batch normalisation over every axis but ``axis``; see the module docstring for formulas."""

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, synchronized=False, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        unsupported = {"beta_regularizer": beta_regularizer, "gamma_regularizer": gamma_regularizer,
                       "beta_constraint": beta_constraint, "gamma_constraint": gamma_constraint}
        for arg, value in unsupported.items():
            if value is not None:
                raise ValueError(f"BatchNormalization: {arg} is not supported (got {value!r})")
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(f"BatchNormalization: axis must be an int, got {axis!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"BatchNormalization: momentum must be in [0, 1], got {momentum}")
        if not epsilon > 0:
            raise ValueError(f"BatchNormalization: epsilon must be > 0, got {epsilon}")
        self.axis, self.momentum, self.epsilon = axis, float(momentum), float(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        self.synchronized = bool(synchronized)     # statistics over every rank's batch
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer
        self.gamma = self.beta = None

    def _channel_axis(self, shape):
        if not -len(shape) <= self.axis < len(shape) or len(shape) < 2:
            raise ValueError(f"BatchNormalization '{self.name}': axis {self.axis} does not fit "
                             f"input shape {format_shape(shape)}")
        axis = self.axis % len(shape)
        if axis == 0:
            raise ValueError(f"BatchNormalization '{self.name}': axis 0 is the batch axis "
                             f"(input shape {format_shape(shape)})")
        return axis

    def build(self, input_shape):
        channels = input_shape[self._channel_axis(input_shape)]
        if channels is None:
            raise ValueError(f"BatchNormalization '{self.name}': the channel axis of input shape "
                             f"{format_shape(input_shape)} must be known")
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight("gamma", shape, self.gamma_initializer)
        if self.center:
            self.beta = self.add_weight("beta", shape, self.beta_initializer)
        self.moving_mean = self.add_weight("moving_mean", shape, self.moving_mean_initializer,
                                           trainable=False)
        self.moving_variance = self.add_weight("moving_variance", shape,
                                               self.moving_variance_initializer, trainable=False)

    def call(self, inputs, training=False, relu=False):
        """``relu=True``: max(y, 0) instead of y (see ``batch_norm_relu``)."""
        axis = self._channel_axis(inputs.shape)
        channels = self.moving_mean.shape[0]
        if inputs.shape[axis] != channels:
            raise ValueError(f"BatchNormalization '{self.name}': built for {channels} channels on "
                             f"axis {self.axis}, got input shape {format_shape(inputs.shape)}")
        last = inputs.ndim - 1
        if axis != last:                    # move the channels last, normalise, move them back
            order = [i for i in range(inputs.ndim) if i != axis] + [axis]
            back = sorted(range(inputs.ndim), key=lambda i: order[i])
            return M.transpose(self._normalize(M.transpose(inputs, order), training, relu),
                               back)
        return self._normalize(inputs, training, relu)

    def _normalize(self, x, training, relu=False):
        """As Keras, float16 / bfloat16 inputs are normalised in float32 (statistics, gamma,
        beta), and the result is cast back to the input's dtype. ``relu``: max(y, 0) taken
        before the cast, fused with the batch norm (``BatchNormReLU``) when it trains on this
        process's batch alone."""
        input_dtype = x.dtype
        if input_dtype.name in mixed_precision.LOW_PRECISION:
            x = mixed_precision.cast(x, "float32")
        if training and self.trainable:
            fn = self._training_function(relu)
            y = fn(x, *self._gamma_beta(x))
            if relu and not isinstance(fn, BatchNormReLU):
                y = A.relu(y)
            mean, var = update_moving_statistics(self.moving_mean.data, self.moving_variance.data,
                                                 fn.batch_mean, fn.batch_var,
                                                 momentum=self.momentum)
            self.moving_mean.data[...] = mean
            self.moving_variance.data[...] = var
        else:
            gamma, beta = self._gamma_beta(x)
            y = batch_norm(x, gamma, beta, self._in(self.moving_mean, x),
                           self._in(self.moving_variance, x), training=False,
                           epsilon=self.epsilon)
            if relu:
                y = A.relu(y)
        return mixed_precision.cast(y, input_dtype)

    def _training_function(self, relu=False):
        if self.synchronized:           # over the global batch when several ranks train
            from minicnn import distributed
            return distributed.batch_norm_function(self.epsilon)
        return BatchNormReLU(self.epsilon) if relu else BatchNorm(self.epsilon)

    def _gamma_beta(self, x):
        return (_constant_or(self._in(self.gamma, x), x, 1),
                _constant_or(self._in(self.beta, x), x, 0))

    @staticmethod
    def _in(weight, x):
        """A weight in x's dtype (differentiably); itself when it matches, None stays None."""
        return None if weight is None else mixed_precision.cast(weight, x.dtype)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "momentum": self.momentum,
                "epsilon": self.epsilon, "center": self.center, "scale": self.scale,
                "synchronized": self.synchronized,
                "beta_initializer": initializer_config(self.beta_initializer),
                "gamma_initializer": initializer_config(self.gamma_initializer),
                "moving_mean_initializer": initializer_config(self.moving_mean_initializer),
                "moving_variance_initializer": initializer_config(
                    self.moving_variance_initializer)}


def batch_norm_relu(bn: BatchNormalization, relu: Layer, x, training=False):
    """``relu(bn(x, training=training))`` for a batch norm whose output nothing else reads (the
    caller's knowledge, e.g. ``ConvBlock``'s). In training, with ``relu`` a plain ReLU layer
    (max(x, 0)), one call of ``bn`` takes the ReLU too: one fused Function (``BatchNormReLU``)
    when bn normalises with this process's batch statistics, else bn's Function then ReLU (a
    synchronized or frozen layer). Otherwise (inference, another activation) the two layers."""
    plain_relu = type(relu) is ReLU and relu.max_value is None and relu.negative_slope == 0 \
        and relu.threshold == 0
    if not (training and plain_relu):
        return relu(bn(x, training=training))
    y = bn(x, training=training, relu=True)
    relu.output_shape = y.shape                 # as if it had been called (summary())
    return y
