"""Differentiable batch normalisation (``kernels.normalization``, through ``kernels.dispatch``);
x: (..., C), parameters (C,).

    training:  y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta, with the batch's mean and
               biased variance; the gradient flows through the statistics as well
               (dx = gamma inv_std / M (M g - sum g - x_hat sum(g x_hat))).
    inference: y = gamma * (x - moving_mean) / sqrt(moving_var + eps) + beta; the statistics are
               constants, so dx = g * gamma / sqrt(moving_var + eps).

    with ReLU: z = max(y, 0) of the training mode (``BatchNormReLU``, ``batch_norm_relu``), one
               Function for a batch norm whose output nothing else reads; dx from dy = g [z > 0].

The functions update nothing: a training call leaves the batch statistics on the Function
(``fn = BatchNorm(eps); y = fn(x, gamma, beta); fn.batch_mean, fn.batch_var``) and the layer
folds them into its moving averages (``kernels.normalization.update_moving_statistics``).
"""
from __future__ import annotations

from kernels import dispatch
from kernels import normalization as K
from kernels.backend import get_array_module
from minicnn.tensor import Function, Tensor, as_tensor


class BatchNorm(Function):
    """Training-mode batch normalisation: inputs (x, gamma, beta)."""

    def __init__(self, epsilon=1e-3):
        self.epsilon = float(epsilon)

    def forward(self, x, gamma, beta):
        y, self.batch_mean, self.batch_var, x_centered, inv_std = \
            dispatch.batch_norm_forward_training(x, gamma, beta, epsilon=self.epsilon)
        self._keep(x_centered, inv_std, gamma, beta)
        return y

    def _keep(self, x_centered, inv_std, gamma, beta):
        """What the backward reads, when an input needs a gradient."""
        if any(self.needs_input_grad):
            self.x_centered, self.inv_std = x_centered, inv_std
            self.gamma, self.beta_dtype = gamma, beta.dtype

    def backward(self, g):
        dx, dgamma, dbeta = dispatch.batch_norm_backward(g, self.x_centered, self.inv_std,
                                                          self.gamma)
        return self._gradients(dx, dgamma, dbeta)

    def _gradients(self, dx, dgamma, dbeta):
        """The gradients the inputs need, gamma's and beta's in their dtypes."""
        need_x, need_gamma, need_beta = self.needs_input_grad
        return (dx if need_x else None,
                dgamma.astype(self.gamma.dtype, copy=False) if need_gamma else None,
                dbeta.astype(self.beta_dtype, copy=False) if need_beta else None)


class BatchNormReLU(BatchNorm):
    """Training-mode batch normalisation then ReLU, in one Function: inputs (x, gamma, beta),
    z = max(y, 0) with y as ``BatchNorm``'s; backward from z: dy = g [z > 0], then BatchNorm's.
    For a batch norm whose output nothing else reads (the caller knows: ``ConvBlock``)."""

    def forward(self, x, gamma, beta):
        z, self.batch_mean, self.batch_var, x_centered, inv_std = \
            dispatch.batch_norm_relu_forward_training(x, gamma, beta, epsilon=self.epsilon)
        self._keep(x_centered, inv_std, gamma, beta)
        self.z = z
        return z

    def backward(self, g):
        dx, dgamma, dbeta = dispatch.batch_norm_relu_backward(g, self.z, self.x_centered,
                                                               self.inv_std, self.gamma)
        return self._gradients(dx, dgamma, dbeta)


class BatchNormInference(Function):
    """Inference-mode batch normalisation: inputs (x, moving_mean, moving_var, gamma, beta);
    the moving statistics get no gradient."""

    def __init__(self, epsilon=1e-3):
        self.epsilon = float(epsilon)

    def forward(self, x, moving_mean, moving_var, gamma, beta):
        if any(self.needs_input_grad):
            self.x, self.moving_mean, self.moving_var, self.gamma, self.beta_dtype = (
                x, moving_mean, moving_var, gamma, beta.dtype)
        return dispatch.batch_norm_forward_inference(x, moving_mean, moving_var, gamma, beta,
                                                     epsilon=self.epsilon)

    def backward(self, g):
        need_x, _, _, need_gamma, need_beta = self.needs_input_grad
        dx = K.batch_norm_backward_inference(g, self.moving_var, self.gamma, epsilon=self.epsilon) \
            if need_x else None
        dgamma = dbeta = None
        if need_gamma or need_beta:
            dgamma, dbeta = K.batch_norm_param_grads_inference(g, self.x, self.moving_mean,
                                                               self.moving_var,
                                                               epsilon=self.epsilon)
            dgamma = dgamma.astype(self.gamma.dtype, copy=False) if need_gamma else None
            dbeta = dbeta.astype(self.beta_dtype, copy=False) if need_beta else None
        return dx, None, None, dgamma, dbeta


def batch_norm(x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *,
               training=False, epsilon=1e-3):
    """Batch normalisation over every axis but the last. x: (..., C); the rest (C,) or None
    (gamma = 1, beta = 0). training=True normalises with the batch's statistics (the moving ones
    are not needed and not updated); training=False with ``moving_mean`` / ``moving_variance``."""
    x = as_tensor(x)
    gamma = _constant_or(gamma, x, 1)
    beta = _constant_or(beta, x, 0)
    if training:
        return BatchNorm(epsilon)(x, gamma, beta)
    if moving_mean is None or moving_variance is None:
        raise ValueError("batch_norm: training=False needs moving_mean and moving_variance")
    return BatchNormInference(epsilon)(x, moving_mean, moving_variance, gamma, beta)


def batch_norm_relu(x, gamma=None, beta=None, *, epsilon=1e-3):
    """max(batch_norm(x, gamma, beta, training=True), 0) as one Function (``BatchNormReLU``).
    x: (..., C); gamma, beta: (C,) or None (gamma = 1, beta = 0)."""
    x = as_tensor(x)
    return BatchNormReLU(epsilon)(x, _constant_or(gamma, x, 1), _constant_or(beta, x, 0))


def _constant_or(value, x, fill):
    """``value``, or a constant (C,) tensor of ``fill`` in x's dtype on x's device."""
    if value is not None:
        return value
    xp = get_array_module(x.data)
    return Tensor(xp.full((x.shape[-1],), fill, dtype=x.dtype))
