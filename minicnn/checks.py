"""``minicnn gradcheck``: a numerical gradient check of every built-in differentiable function.

Each check runs a function on small random float64 inputs and compares its autograd gradient
with central differences (the logic of ``minicnn.gradcheck``: the output projected on a fixed
random direction r, ``L = sum(f(x) * r)``, and ``dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / 2 eps``).
The table gives, per check, the largest relative error

    max_i |analytic_i - numeric_i| / max_i |numeric_i|     (over every input checked)

and whether every element passed ``minicnn.gradcheck``'s rule
``|analytic - numeric| <= atol + rtol * |numeric|``.

The checks are found by importing the function modules (``minicnn.functions.*``) and every
``Loss`` class of ``minicnn.losses``; a module or name that cannot be imported is a failed row,
not a crash.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import numpy as np

from minicnn.gradcheck import gradient_pairs

EPS, ATOL, RTOL = 1e-6, 1e-6, 1e-4


# -- the measurement --------------------------------------------------------------------------------
@dataclass
class GradientErrors:
    """What one check measured: the largest relative and absolute error, and the verdict."""
    relative: float
    absolute: float
    passed: bool
    worst_input: str


def gradient_errors(fn, *arrays, eps: float = EPS, atol: float = ATOL, rtol: float = RTOL,
                    max_elements: int = 512, directions: int = 16, seed: int = 0,
                    names=None) -> GradientErrors:
    """The errors ``minicnn.gradcheck(fn, *arrays)`` tests, returned instead of raised.

    The relative error of an input is max|analytic - numeric| / max|numeric| (relative to the
    largest gradient entry, so that zero-gradient entries of relu or max pooling do not turn
    noise into large ratios); the verdict is gradcheck's element-wise rule.
    """
    result = GradientErrors(0.0, 0.0, True, "")
    for name, analytic, numeric, _ in gradient_pairs(
            fn, *arrays, eps=eps, max_elements=max_elements, directions=directions, seed=seed,
            names=names):
        error = np.abs(analytic - numeric)
        scale = float(np.abs(numeric).max()) if numeric.size else 0.0
        relative = float(error.max()) / scale if scale > 0 else float(error.max(initial=0.0))
        if relative >= result.relative:
            result.relative, result.worst_input = relative, name
        result.absolute = max(result.absolute, float(error.max(initial=0.0)))
        result.passed &= bool(np.all(error <= atol + rtol * np.abs(numeric)))
    return result


# -- inputs -----------------------------------------------------------------------------------------
def _normal(rs, *shape):
    return rs.standard_normal(shape)


def _positive(rs, *shape):
    return rs.uniform(0.5, 2.0, shape)


def _distinct(rs, *shape):
    """Values with gaps of at least 0.05 between any two (max pooling has no near-ties)."""
    count = int(np.prod(shape))
    return (rs.permutation(count) * 0.05 + rs.uniform(0.0, 0.01, count) - count * 0.025).reshape(shape)


def _away_from(rs, shape, kinks=(0.0,), gap=0.05):
    """N(0, 1) values at least ``gap`` from every kink (where the function has no derivative)."""
    x = rs.standard_normal(shape)
    for kink in kinks:
        near = np.abs(x - kink) < gap
        x = np.where(near, kink + np.where(x >= kink, gap, -gap) + (x - kink), x)
    return x


def _probabilities(rs, *shape):
    """Rows (last axis) summing to one, each entry well inside (0, 1)."""
    p = rs.uniform(0.2, 1.0, shape)
    return p / p.sum(axis=-1, keepdims=True)


def _one_hot(rs, *shape):
    labels = rs.integers(0, shape[-1], shape[:-1])
    return np.eye(shape[-1])[labels]


# -- the checks -------------------------------------------------------------------------------------
@dataclass
class Check:
    """One row of the table: ``build(rs)`` returns (fn, arrays, input names)."""
    name: str
    build: object


def _math_checks() -> list:
    from minicnn.functions import math as M
    return [
        Check("add (broadcast)", lambda rs: (M.add, [_normal(rs, 2, 3), _normal(rs, 3)], ["a", "b"])),
        Check("sub (broadcast)", lambda rs: (M.sub, [_normal(rs, 2, 1), _normal(rs, 2, 3)], ["a", "b"])),
        Check("mul (broadcast)", lambda rs: (M.mul, [_normal(rs, 2, 3), _normal(rs, 2, 1)], ["a", "b"])),
        Check("div (broadcast)", lambda rs: (M.div, [_normal(rs, 2, 3), _positive(rs, 3)], ["a", "b"])),
        Check("neg", lambda rs: (M.neg, [_normal(rs, 2, 3)], ["x"])),
        Check("power x**3", lambda rs: (lambda x: M.power(x, 3), [_normal(rs, 2, 3)], ["x"])),
        Check("power x**y (tensor exponent)",
              lambda rs: (M.power, [_positive(rs, 2, 3), _normal(rs, 2, 3)], ["x", "y"])),
        Check("exp", lambda rs: (M.exp, [_normal(rs, 2, 3)], ["x"])),
        Check("log", lambda rs: (M.log, [_positive(rs, 2, 3)], ["x"])),
        Check("sqrt", lambda rs: (M.sqrt, [_positive(rs, 2, 3)], ["x"])),
        Check("matmul (batched)", lambda rs: (M.matmul, [_normal(rs, 2, 3, 4), _normal(rs, 4, 2)],
                                              ["a", "b"])),
        Check("sum axis=1", lambda rs: (lambda x: M.sum(x, axis=1), [_normal(rs, 2, 3, 2)], ["x"])),
        Check("mean keepdims", lambda rs: (lambda x: M.mean(x, axis=(0, 2), keepdims=True),
                                           [_normal(rs, 2, 3, 2)], ["x"])),
        Check("max axis=-1", lambda rs: (lambda x: M.max(x, axis=-1), [_distinct(rs, 3, 4)], ["x"])),
        Check("reshape", lambda rs: (lambda x: M.reshape(x, (3, 4)), [_normal(rs, 2, 6)], ["x"])),
        Check("transpose", lambda rs: (lambda x: M.transpose(x, (2, 0, 1)), [_normal(rs, 2, 3, 4)],
                                       ["x"])),
        Check("getitem (slice, fancy)", lambda rs: (
            lambda x: M.getitem(x, (slice(1, None), np.array([0, 2, 2]))), [_normal(rs, 3, 4)], ["x"])),
        Check("concatenate", lambda rs: (lambda a, b: M.concatenate([a, b], axis=-1),
                                         [_normal(rs, 2, 2, 3), _normal(rs, 2, 2, 1)], ["a", "b"])),
        Check("stack", lambda rs: (lambda a, b: M.stack([a, b], axis=1),
                                   [_normal(rs, 2, 3), _normal(rs, 2, 3)], ["a", "b"])),
        Check("pad", lambda rs: (lambda x: M.pad(x, ((0, 0), (1, 2), (2, 0), (0, 0)), value=0.5),
                                 [_normal(rs, 1, 3, 3, 2)], ["x"])),
        Check("dense (x @ W + b)", lambda rs: (lambda x, w, b: M.add(M.matmul(x, w), b),
                                               [_normal(rs, 3, 4), _normal(rs, 4, 2), _normal(rs, 2)],
                                               ["x", "kernel", "bias"])),
    ]


def _conv_checks() -> list:
    from minicnn.functions import conv as C
    x, w = (2, 5, 6, 2), (3, 3, 2, 3)
    return [
        Check("conv2d valid", lambda rs: (lambda x_, w_, b_: C.conv2d(x_, w_, b_),
                                          [_normal(rs, *x), _normal(rs, *w), _normal(rs, 3)],
                                          ["x", "kernel", "bias"])),
        Check("conv2d strides=2 padding=same", lambda rs: (
            lambda x_, w_: C.conv2d(x_, w_, strides=2, padding="same"),
            [_normal(rs, *x), _normal(rs, *w)], ["x", "kernel"])),
        Check("conv2d dilation=2 padding=same", lambda rs: (
            lambda x_, w_: C.conv2d(x_, w_, dilation=2, padding="same"),
            [_normal(rs, 1, 6, 5, 2), _normal(rs, *w)], ["x", "kernel"])),
        Check("conv2d strides=(2,1) 2x1 kernel", lambda rs: (
            lambda x_, w_: C.conv2d(x_, w_, strides=(2, 1)),
            [_normal(rs, *x), _normal(rs, 2, 1, 2, 3)], ["x", "kernel"])),
        Check("conv2d_transpose strides=2", lambda rs: (
            lambda y_, w_, b_: C.conv2d_transpose(y_, w_, b_, strides=2),
            [_normal(rs, 1, 3, 3, 2), _normal(rs, 2, 2, 3, 2), _normal(rs, 3)],
            ["x", "kernel", "bias"])),
        Check("conv2d_transpose 3x3 strides=2 same", lambda rs: (
            lambda y_, w_: C.conv2d_transpose(y_, w_, strides=2, padding="same"),
            [_normal(rs, 1, 3, 2, 2), _normal(rs, 3, 3, 2, 2)], ["x", "kernel"])),
        Check("conv2d_transpose 3x3 strides=2 output_padding=1", lambda rs: (
            lambda y_, w_: C.conv2d_transpose(y_, w_, strides=2, output_padding=1),
            [_normal(rs, 1, 2, 3, 2), _normal(rs, 3, 3, 1, 2)], ["x", "kernel"])),
        Check("depthwise_conv2d multiplier=2", lambda rs: (
            lambda x_, w_, b_: C.depthwise_conv2d(x_, w_, b_, padding="same"),
            [_normal(rs, 1, 4, 5, 2), _normal(rs, 3, 3, 2, 2), _normal(rs, 4)],
            ["x", "kernel", "bias"])),
        Check("depthwise_conv2d strides=2", lambda rs: (
            lambda x_, w_: C.depthwise_conv2d(x_, w_, strides=2),
            [_normal(rs, 1, 5, 5, 3), _normal(rs, 2, 2, 3, 1)], ["x", "kernel"])),
        Check("depthwise_conv2d dilation=2 padding=same", lambda rs: (
            lambda x_, w_: C.depthwise_conv2d(x_, w_, dilation=2, padding="same"),
            [_normal(rs, 1, 5, 4, 2), _normal(rs, 3, 2, 2, 1)], ["x", "kernel"])),
        Check("separable_conv2d", lambda rs: (
            lambda x_, d_, p_, b_: C.separable_conv2d(x_, d_, p_, b_, padding="same"),
            [_normal(rs, 1, 4, 4, 2), _normal(rs, 3, 3, 2, 2), _normal(rs, 1, 1, 4, 3),
             _normal(rs, 3)], ["x", "depthwise_kernel", "pointwise_kernel", "bias"])),
        Check("pad2d", lambda rs: (lambda x_: C.pad2d(x_, ((1, 2), (0, 1))),
                                   [_normal(rs, 1, 3, 3, 2)], ["x"])),
        Check("crop2d", lambda rs: (lambda x_: C.crop2d(x_, ((1, 0), (1, 2))),
                                    [_normal(rs, 1, 4, 5, 2)], ["x"])),
    ]


def _pooling_checks() -> list:
    from minicnn.functions import pooling as P
    checks = [
        Check("max_pool2d 2x2", lambda rs: (lambda x: P.max_pool2d(x, pool_size=2),
                                            [_distinct(rs, 2, 4, 4, 2)], ["x"])),
        Check("max_pool2d 3x3 strides=2 same", lambda rs: (
            lambda x: P.max_pool2d(x, pool_size=3, strides=2, padding="same"), [_distinct(rs, 1, 5, 6, 2)], ["x"])),
        Check("avg_pool2d 2x2", lambda rs: (lambda x: P.avg_pool2d(x, pool_size=2),
                                            [_normal(rs, 2, 4, 4, 2)], ["x"])),
        Check("avg_pool2d 3x3 strides=2 same", lambda rs: (
            lambda x: P.avg_pool2d(x, pool_size=3, strides=2, padding="same"), [_normal(rs, 1, 5, 6, 2)], ["x"])),
        Check("global_avg_pool2d", lambda rs: (P.global_avg_pool2d, [_normal(rs, 2, 3, 4, 2)], ["x"])),
        Check("upsample2d nearest 2x3", lambda rs: (
            lambda x: P.upsample2d(x, size=(2, 3)), [_normal(rs, 1, 3, 2, 2)], ["x"])),
        Check("upsample2d bilinear 2x2", lambda rs: (
            lambda x: P.upsample2d(x, size=2, interpolation="bilinear"), [_normal(rs, 1, 3, 4, 2)], ["x"])),
    ]
    if hasattr(P, "global_max_pool2d"):
        checks.append(Check("global_max_pool2d", lambda rs: (
            P.global_max_pool2d, [_distinct(rs, 2, 3, 3, 2)], ["x"])))
    return checks


def _normalization_checks() -> list:
    from minicnn.functions import normalization as N
    return [
        Check("batch_norm training", lambda rs: (
            lambda x, g, b: N.batch_norm(x, g, b, training=True),
            [_normal(rs, 3, 2, 2, 3), _positive(rs, 3), _normal(rs, 3)], ["x", "gamma", "beta"])),
        Check("batch_norm inference", _batch_norm_inference),
        Check("batch_norm_relu training", _batch_norm_relu),
    ]


def _batch_norm_relu(rs, gap=0.05):
    """Inputs whose batch-norm outputs lie at least ``gap`` from ReLU's kink (redrawn until)."""
    from kernels.normalization import batch_norm_forward_training
    from minicnn.functions import normalization as N
    while True:
        x, gamma, beta = _normal(rs, 3, 2, 2, 3), _positive(rs, 3), _normal(rs, 3)
        if np.abs(batch_norm_forward_training(x, gamma, beta)[0]).min() >= gap:
            return (lambda x, g, b: N.batch_norm_relu(x, g, b), [x, gamma, beta],
                    ["x", "gamma", "beta"])


def _batch_norm_inference(rs):
    """The moving statistics are state, not inputs that receive gradients: held constant."""
    from minicnn.functions import normalization as N
    mean, variance = _normal(rs, 3), _positive(rs, 3)
    return (lambda x, g, b: N.batch_norm(x, g, b, mean, variance, training=False),
            [_normal(rs, 2, 2, 2, 3), _positive(rs, 3), _normal(rs, 3)], ["x", "gamma", "beta"])


def _activation_checks() -> list:
    from minicnn.functions import activations as A
    return [
        Check("relu", lambda rs: (A.relu, [_away_from(rs, (2, 3, 3))], ["x"])),
        Check("relu (max_value=1, threshold=0.2, slope=0.1)", lambda rs: (
            lambda x: A.relu(x, negative_slope=0.1, max_value=1.0, threshold=0.2),
            [_away_from(rs, (3, 4), kinks=(0.2, 1.0))], ["x"])),
        Check("leaky_relu", lambda rs: (lambda x: A.leaky_relu(x, negative_slope=0.2),
                                        [_away_from(rs, (2, 3, 3))], ["x"])),
        Check("sigmoid", lambda rs: (A.sigmoid, [_normal(rs, 2, 3, 3)], ["x"])),
        Check("tanh", lambda rs: (A.tanh, [_normal(rs, 2, 3, 3)], ["x"])),
        Check("softmax axis=-1", lambda rs: (A.softmax, [_normal(rs, 2, 3, 4)], ["x"])),
        Check("softmax axis=1", lambda rs: (lambda x: A.softmax(x, axis=1),
                                            [_normal(rs, 2, 3, 4)], ["x"])),
        Check("log_softmax", lambda rs: (A.log_softmax, [_normal(rs, 2, 3, 4)], ["x"])),
        Check("dropout (fixed mask)", lambda rs: (lambda x: A.dropout(x, rate=0.4, seed=7),
                                                  [_normal(rs, 3, 4)], ["x"])),
    ]


def _loss_inputs(cls, from_logits: bool, rs):
    """(y_true, y_pred) suited to a loss class: integer labels for the sparse ones, targets of
    y_pred's shape for the others; logits or probabilities as ``from_logits`` says."""
    from minicnn import losses as L
    name = cls.__name__
    shape = (2, 3, 3, 3)
    if issubclass(cls, L.SparseCategoricalCrossentropy) or "Sparse" in name:
        y_true = rs.integers(0, shape[-1], shape[:-1])
    elif issubclass(cls, L.MeanSquaredError):
        return _normal(rs, *shape), _normal(rs, *shape)
    elif "Binary" in name:
        y_true = rs.integers(0, 2, shape).astype(np.float64)
        y_pred = _normal(rs, *shape) if from_logits else rs.uniform(0.1, 0.9, shape)
        return y_true, y_pred
    else:
        y_true = _one_hot(rs, *shape)
    y_pred = _normal(rs, *shape) if from_logits else _probabilities(rs, *shape)
    return y_true, y_pred


def _loss_checks() -> list:
    """One check per Loss class of minicnn.losses (two where it takes ``from_logits``)."""
    from minicnn import losses as L
    classes = [cls for name, cls in inspect.getmembers(L, inspect.isclass)
               if issubclass(cls, L.Loss) and cls is not L.Loss and not name.startswith("_")
               and cls.__module__ == L.__name__]
    checks = []
    for cls in sorted(classes, key=lambda c: c.__name__):
        settings = [{}]
        if "from_logits" in inspect.signature(cls).parameters:
            settings = [{"from_logits": False}, {"from_logits": True}]
        for kwargs in settings:
            label = cls.__name__ + ("" if not kwargs else f" from_logits={kwargs['from_logits']}")

            def build(rs, cls=cls, kwargs=kwargs):
                loss = cls(**kwargs)
                y_true, y_pred = _loss_inputs(cls, kwargs.get("from_logits", False), rs)
                return (lambda pred: loss(y_true, pred)), [y_pred], ["y_pred"]
            checks.append(Check(label, build))
    return checks + _loss_option_checks()


def _loss_option_checks() -> list:
    """The options that change a loss's formula: smoothing, class weights, ignored class,
    a per-pixel weight map, the focal settings."""
    from minicnn import losses as L
    weights = np.array([0.5, 1.0, 2.0])
    options = [
        ("CategoricalCrossentropy label_smoothing=0.1", L.CategoricalCrossentropy,
         dict(label_smoothing=0.1), False),
        ("BinaryCrossentropy logits label_smoothing=0.2", L.BinaryCrossentropy,
         dict(from_logits=True, label_smoothing=0.2), False),
        ("SparseCategoricalCrossentropy logits class_weight", L.SparseCategoricalCrossentropy,
         dict(from_logits=True, class_weight=weights), False),
        ("SparseCategoricalCrossentropy logits ignore_class=0", L.SparseCategoricalCrossentropy,
         dict(from_logits=True, ignore_class=0), False),
        ("SparseCategoricalCrossentropy logits weight map", L.SparseCategoricalCrossentropy,
         dict(from_logits=True), True),
        ("CEDice logits ignore_class=2 smooth=0.5", L.CEDice,
         dict(from_logits=True, ignore_class=2, smooth=0.5), False),
        ("BinaryFocalCrossentropy class balancing gamma=1.5", L.BinaryFocalCrossentropy,
         dict(apply_class_balancing=True, gamma=1.5), False),
    ]
    checks = []
    for label, cls, kwargs, weight_map in options:
        def build(rs, cls=cls, kwargs=kwargs, weight_map=weight_map):
            loss = cls(**kwargs)
            y_true, y_pred = _loss_inputs(cls, kwargs.get("from_logits", False), rs)
            weight = rs.uniform(0.5, 2.0, y_pred.shape[:-1]) if weight_map else None
            return (lambda pred: loss(y_true, pred, sample_weight=weight)), [y_pred], ["y_pred"]
        checks.append(Check(label, build))
    return checks


GROUPS = [
    ("minicnn.functions.math", _math_checks),
    ("minicnn.functions.conv", _conv_checks),
    ("minicnn.functions.pooling", _pooling_checks),
    ("minicnn.functions.normalization", _normalization_checks),
    ("minicnn.functions.activations", _activation_checks),
    ("minicnn.losses", _loss_checks),
]


def all_checks() -> list:
    """(group, Check or the exception that prevented listing the group) for every group."""
    found = []
    for group, make in GROUPS:
        try:
            found += [(group, check) for check in make()]
        except Exception as error:          # a missing module is a failed row, not a crash
            found.append((group, error))
    return found


# -- the table --------------------------------------------------------------------------------------
def run_all_gradchecks(print_fn=print, seed: int = 0) -> int:
    """Check every built-in function; print a table; return the number of failed checks."""
    started = time.perf_counter()
    width = 56
    print_fn(f"gradient checks: float64, central differences eps={EPS:g}, pass when "
             f"|analytic - numeric| <= {ATOL:g} + {RTOL:g} |numeric| everywhere")
    print_fn(f"{'function':<{width}} {'max rel err':>12} {'max abs err':>12}  result")
    print_fn("-" * (width + 34))
    failures = total = 0
    current = None
    for group, check in all_checks():
        if group != current:
            print_fn(f"[{group}]")
            current = group
        total += 1
        if isinstance(check, Exception):
            failures += 1
            print_fn(f"  {'(cannot list)':<{width - 2}} {'':>12} {'':>12}  ERROR "
                     f"{type(check).__name__}: {check}")
            continue
        rs = np.random.default_rng([seed, total])
        try:
            fn, arrays, names = check.build(rs)
            errors = gradient_errors(fn, *arrays, names=names, seed=seed)
        except Exception as error:
            failures += 1
            print_fn(f"  {check.name:<{width - 2}} {'':>12} {'':>12}  ERROR "
                     f"{type(error).__name__}: {error}")
            continue
        failures += not errors.passed
        verdict = "pass" if errors.passed else f"FAIL (worst: {errors.worst_input})"
        print_fn(f"  {check.name:<{width - 2}} {errors.relative:>12.2e} {errors.absolute:>12.2e}  "
                 f"{verdict}")
    print_fn("-" * (width + 34))
    print_fn(f"{total - failures} of {total} passed, {failures} failed "
             f"({time.perf_counter() - started:.1f} s)")
    return failures
