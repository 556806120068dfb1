"""A numerical gradient checker: autograd against central differences, in float64.

For a function ``f`` of arrays, the analytic gradient of ``L = sum(f(x) * r)`` (``r`` a fixed
random projection, so non-scalar outputs are checked in every direction at once) is compared with

    dL/dx[i] ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

element by element for small inputs, and along random unit directions ``d`` for large ones
(``<grad, d>`` against ``(L(x + eps d) - L(x - eps d)) / (2 eps)``). An element passes when
``|analytic - numeric| <= atol + rtol * |numeric|``.
"""
from __future__ import annotations

import numpy as np

from kernels.backend import get_array_module, to_numpy
from minicnn.tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """The analytic and numerical gradients disagree."""


def gradcheck(fn, *arrays, eps: float = 1e-6, atol: float = 1e-7, rtol: float = 1e-6,
              max_elements: int = 512, directions: int = 16, seed: int = 0,
              names=None) -> bool:
    """Check the autograd gradient of ``fn`` with respect to every floating-point input.

    fn: takes Tensors (one per array) and returns a Tensor.
    arrays: NumPy/CuPy arrays or Tensors; floating ones are checked in float64, others
        (integer labels, say) are passed through as constants.
    max_elements: inputs up to this size are checked element by element; larger ones along
        ``directions`` random unit directions.
    Returns True, or raises GradcheckError naming the input, the worst element, both values
    and the error.
    """
    for name, analytic, numeric, what in gradient_pairs(
            fn, *arrays, eps=eps, max_elements=max_elements, directions=directions, seed=seed,
            names=names):
        _compare(name, analytic, numeric, atol, rtol, what)
    return True


def gradient_pairs(fn, *arrays, eps: float = 1e-6, max_elements: int = 512, directions: int = 16,
                   seed: int = 0, names=None) -> list:
    """(input name, analytic, numeric, 'element' | 'direction') for every floating input:
    the two gradients as host arrays, element by element or projected on random directions."""
    values = [a.data if isinstance(a, Tensor) else a for a in arrays]
    xp = get_array_module(*values)
    values = [xp.ascontiguousarray(xp.asarray(v)) for v in values]
    values = [v.astype(xp.float64) if v.dtype.kind == "f" else v for v in values]
    checked = [i for i, v in enumerate(values) if v.dtype.kind == "f"]
    names = list(names) if names is not None else [f"input {i}" for i in range(len(values))]
    rs = np.random.default_rng(seed)

    def run(*vals, requires_grad=False):
        tensors = [Tensor(v.copy() if i in checked else v, requires_grad=requires_grad and i in checked)
                   for i, v in enumerate(vals)]
        return tensors, fn(*tensors)

    tensors, output = run(*values, requires_grad=True)
    if not isinstance(output, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(output).__name__}")
    projection = xp.asarray(rs.standard_normal(output.shape))
    (output * Tensor(projection)).sum().backward()

    def objective(vals):
        with no_grad():
            return float((run(*vals)[1].data * projection).sum())

    pairs = []
    for i in checked:
        analytic = tensors[i].grad
        analytic = xp.zeros_like(values[i]) if analytic is None else analytic
        if values[i].size <= max_elements:
            numeric = np.array([_central_difference(objective, values, i, j, None, eps)
                                for j in range(values[i].size)]).reshape(values[i].shape)
            pairs.append((names[i], to_numpy(analytic), numeric, "element"))
        else:
            analytic_d, numeric_d = [], []
            for _ in range(directions):
                direction = rs.standard_normal(values[i].shape)
                direction = xp.asarray(direction / np.linalg.norm(direction))
                analytic_d.append(float((analytic * direction).sum()))
                numeric_d.append(_central_difference(objective, values, i, None, direction, eps))
            pairs.append((names[i], np.array(analytic_d), np.array(numeric_d), "direction"))
    return pairs


def _central_difference(objective, values, i, j, direction, eps):
    """(L(x + eps d) - L(x - eps d)) / (2 eps), d a unit vector e_j or a given direction."""
    plus = list(values)
    minus = list(values)
    if direction is None:
        step = values[i].copy().reshape(-1)
        step[:] = 0
        step[j] = eps
        step = step.reshape(values[i].shape)
    else:
        step = direction * eps
    plus[i] = values[i] + step
    minus[i] = values[i] - step
    return (objective(plus) - objective(minus)) / (2 * eps)


def _compare(name, analytic, numeric, atol, rtol, what):
    error = np.abs(analytic - numeric)
    allowed = atol + rtol * np.abs(numeric)
    if np.all(error <= allowed):
        return
    worst = np.unravel_index(np.argmax(error / allowed), error.shape)
    raise GradcheckError(
        f"gradcheck failed for {name}: worst {what} {tuple(int(k) for k in worst)}: "
        f"analytic {analytic[worst]:.8g}, numeric {numeric[worst]:.8g}, "
        f"error {error[worst]:.3g} > allowed {allowed[worst]:.3g} "
        f"({int(np.sum(error > allowed))} of {error.size} {what}s fail)")


def numerical_gradient(f, x, projection=None, eps: float = 1e-6) -> np.ndarray:
    """Central differences of ``sum(f(x) * projection)`` (of the scalar ``f(x)`` when
    ``projection`` is None) with respect to every element of the NumPy array ``x``:
    the array-level check used by the kernel tests."""
    def objective(v):
        out = f(v)
        return float(np.sum(out * projection)) if projection is not None else float(out)

    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += eps
        minus[i] -= eps
        grad[i] = (objective(plus) - objective(minus)) / (2 * eps)
    return grad
