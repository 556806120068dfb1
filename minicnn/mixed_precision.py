"""Mixed precision with Keras 3's names: dtype policies, loss scaling, and the TF32 switch.

    mc.mixed_precision.set_global_policy("mixed_float16")    # or "mixed_bfloat16", "float32"
    model = mc.models.UNet(num_classes=2)                    # layers made now take the policy
    model.compile(optimizer="adam", loss=...)                # mixed_float16: Adam is wrapped in
                                                             # a LossScaleOptimizer, as Keras does

A policy (``DTypePolicy``, alias ``Policy``) names two dtypes (Keras' strings):

    name              compute_dtype   variable_dtype
    "float32"         float32         float32          (any float dtype name: both that dtype)
    "mixed_float16"   float16         float32
    "mixed_bfloat16"  bfloat16        float32

A layer takes the global policy when it is made, or its own (``Conv2D(8, 3, dtype="float32")``).
Under a mixed policy, as in Keras:
- weights and the optimizer's slots stay in the variable dtype (float32 "master weights");
  a layer reads its kernel and bias cast to the compute dtype (``Layer.cast_weight``), and the
  cast's backward turns their gradient back into float32;
- floating inputs are cast to the compute dtype on the way into a layer (``Layer.__call__``);
- BatchNormalization computes in float32 (statistics, moving averages, gamma and beta) and
  returns the compute dtype; losses compute in float32 when given 16-bit predictions.

float16 has 5 exponent bits: gradients below 6e-8 vanish, so ``mixed_float16`` needs loss
scaling (``LossScaleOptimizer``: the loss is multiplied by a large scale before backward and
the gradients divided by it before the update; non-finite gradients skip the step). bfloat16
has float32's 8 exponent bits but 7 mantissa bits (eps 2**-7 = 0.0078, float16: 2**-10): no
scaling. bfloat16 arrays come from the optional ``ml_dtypes`` package (``pip install
ml_dtypes``), on NumPy and on CuPy alike (CuPy's own bfloat16 is ml_dtypes').

TF32 is a separate switch for float32 matrix products on the GPU (``enable_tensor_float_32_
execution``, TensorFlow's name; Keras has none), off by default as in PyTorch; see
``kernels.backend.set_tf32`` for what it costs in accuracy.

``set_precision("float32" | "tf32" | "bf16" | "fp16")`` is the one-word form used by
``minicnn train --precision``.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import backend
from minicnn.optimizers import Optimizer
from minicnn.tensor import Function, Tensor

MIXED = {"mixed_float16": ("float16", "float32"), "mixed_bfloat16": ("bfloat16", "float32")}
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
LOW_PRECISION = ("float16", "bfloat16")


# =============================================================================== dtypes
def bfloat16_available() -> bool:
    """True when ``ml_dtypes`` imports (it registers bfloat16 with NumPy)."""
    try:
        import ml_dtypes  # noqa: F401  (optional extra)
        return True
    except ImportError:
        return False


def as_dtype(name) -> np.dtype:
    """The NumPy dtype of a float name ('float16', 'bfloat16', 'float32', 'float64') or dtype;
    bfloat16 through ``ml_dtypes`` (RuntimeError naming it when it is not installed)."""
    if isinstance(name, str) and name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise RuntimeError("bfloat16 needs the ml_dtypes package (pip install ml_dtypes); "
                               "use 'mixed_float16' or 'float32' without it") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _standard_name(name, where) -> str:
    try:
        dtype = as_dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not backend.is_floating(dtype):
        raise ValueError(f"{where}: Cannot convert {name!r} to a mixed precision DTypePolicy. "
                         "Valid policies include 'mixed_float16', 'mixed_bfloat16', and the "
                         "name of any float dtype such as 'float32'.")
    return dtype.name


# =============================================================================== policies
class DTypePolicy:
    """A layer's computation and variable dtypes (Keras 3 ``keras.DTypePolicy``).

    name: a float dtype name ('float32', 'float64', 'float16', 'bfloat16': both dtypes that
    one), 'mixed_float16' (compute float16, variables float32) or 'mixed_bfloat16' (compute
    bfloat16, variables float32); None: the global policy's name. ``compute_dtype`` and
    ``variable_dtype`` are strings, as in Keras.
    """

    def __init__(self, name=None):
        if name is None:
            name = global_policy().name
        if not isinstance(name, str):
            raise TypeError(f"DTypePolicy: 'name' must be a string, such as 'mixed_float16'. "
                            f"Received: name={name!r} (of type {type(name).__name__})")
        if name in MIXED:
            self._compute_dtype, self._variable_dtype = MIXED[name]
            as_dtype(self._compute_dtype)             # bfloat16: fail now if ml_dtypes is absent
        else:
            self._compute_dtype = self._variable_dtype = _standard_name(name, "DTypePolicy")
        self._name = name

    name = property(lambda self: self._name, doc="The policy's name.")
    compute_dtype = property(lambda self: self._compute_dtype,
                             doc="The dtype layers compute (and output) in, a string.")
    variable_dtype = property(lambda self: self._variable_dtype,
                              doc="The dtype layers create their weights in, a string.")

    @property
    def is_mixed(self) -> bool:
        """True when the compute and variable dtypes differ (not a Keras property)."""
        return self._compute_dtype != self._variable_dtype

    def get_config(self) -> dict:
        return {"name": self._name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, DTypePolicy) and other.name == self.name

    def __hash__(self):
        return hash(self._name)

    def __repr__(self):
        return f'<DTypePolicy "{self._name}">'


Policy = DTypePolicy                 # Keras' legacy name, keras.mixed_precision.Policy
_global_policy = None


def set_global_policy(policy) -> None:
    """Set the policy of the layers made from now on (Keras' ``set_global_policy`` /
    ``keras.config.set_dtype_policy``): a policy name or a ``DTypePolicy``."""
    global _global_policy
    if isinstance(policy, str):
        policy = DTypePolicy(policy)
    if not isinstance(policy, DTypePolicy):
        raise ValueError(f"set_global_policy: Invalid `policy` argument. Expected the string name "
                         f"of a policy (such as 'mixed_float16') or a `DTypePolicy` instance. "
                         f"Received: policy={policy!r} (of type {type(policy).__name__})")
    _global_policy = policy


def global_policy() -> DTypePolicy:
    """The global policy (float32 until ``set_global_policy`` is called), as Keras."""
    global _global_policy
    if _global_policy is None:
        _global_policy = DTypePolicy("float32")
    return _global_policy


set_dtype_policy = set_global_policy     # Keras 3's keras.config names
dtype_policy = global_policy


def get(identifier) -> DTypePolicy:
    """A layer's policy from its ``dtype=`` argument: None (the global policy), a policy, a
    policy name or a NumPy dtype."""
    if identifier is None:
        return global_policy()
    if isinstance(identifier, DTypePolicy):
        return identifier
    if isinstance(identifier, str):
        return DTypePolicy(identifier)
    try:
        return DTypePolicy(np.dtype(identifier).name)
    except TypeError:
        raise TypeError(f"dtype must be a policy, a policy name or a float dtype, got "
                        f"{identifier!r}") from None


def loss_dtype(pred_dtype) -> np.dtype:
    """The dtype a loss computes in for predictions of ``pred_dtype``: float32 for float16 and
    bfloat16 (Keras' losses compute in float32), else the predictions' own float dtype."""
    dtype = np.dtype(pred_dtype)
    return np.dtype(np.float32) if dtype.name in LOW_PRECISION else dtype


# =============================================================================== casting
class Cast(Function):
    """y = x in ``dtype``;  dx = g in x's dtype (so a float32 weight read as float16 gets a
    float32 gradient, and a float32 loss sends its gradient back as float16)."""

    def __init__(self, dtype):
        self.dtype = as_dtype(dtype)

    def forward(self, x):
        self.source = x.dtype
        return x.astype(self.dtype)

    def backward(self, g):
        return g.astype(self.source)


def cast(x, dtype) -> Tensor:
    """``x`` (a Tensor) in ``dtype``, differentiably; ``x`` itself when it has that dtype."""
    dtype = as_dtype(dtype)
    if isinstance(x, Tensor) and x.dtype == dtype:
        return x
    return Cast(dtype)(x)


# =============================================================================== loss scaling
class LossScaleOptimizer(Optimizer):
    """Dynamic loss scaling around an optimizer (Keras 3 ``keras.optimizers.LossScaleOptimizer``).

    Train with ``opt.scale_loss(loss).backward()`` then ``opt.step(weights)`` (``fit`` does it).
    ``step``: if every gradient is finite, the gradients are divided by the scale (in place, in
    ``.grad``), the inner optimizer steps, and after ``dynamic_growth_steps`` such steps in a
    row the scale doubles; otherwise the step is skipped (weights, slots and ``iterations``
    unchanged) and the scale halves. initial_scale 2**15 and dynamic_growth_steps 2000 are
    Keras' defaults. ``iterations`` and ``learning_rate`` are the inner optimizer's.
    """

    def __init__(self, inner_optimizer, initial_scale=2.0 ** 15, dynamic_growth_steps=2000,
                 name=None):
        if not isinstance(inner_optimizer, Optimizer) or isinstance(inner_optimizer,
                                                                    LossScaleOptimizer):
            raise TypeError(f"LossScaleOptimizer: inner_optimizer must be a minicnn optimizer "
                            f"(not itself loss-scaled), got {inner_optimizer!r}")
        if not isinstance(initial_scale, (int, float)) or not initial_scale > 0 or \
                not math.isfinite(initial_scale):
            raise ValueError(f"LossScaleOptimizer: initial_scale must be a positive finite "
                             f"number, got {initial_scale!r}")
        if isinstance(dynamic_growth_steps, bool) or not isinstance(dynamic_growth_steps, int) \
                or dynamic_growth_steps < 1:
            raise ValueError(f"LossScaleOptimizer: dynamic_growth_steps must be an int >= 1, got "
                             f"{dynamic_growth_steps!r}")
        self.inner_optimizer = inner_optimizer
        self.initial_scale = float(initial_scale)
        self.dynamic_growth_steps = dynamic_growth_steps
        self.name = name or "loss_scale_optimizer"
        self.dynamic_scale = self.initial_scale     # Keras' variable names
        self.step_counter = 0

    # -- the inner optimizer's facts ------------------------------------------------------------
    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @iterations.setter
    def iterations(self, value):
        self.inner_optimizer.iterations = value

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner_optimizer.learning_rate = value

    def current_learning_rate(self) -> float:
        return self.inner_optimizer.current_learning_rate()

    def __getattr__(self, name):
        """Anything else (slots, clip settings ...) is the inner optimizer's."""
        if name == "inner_optimizer":               # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner_optimizer, name)

    # -- scaling -------------------------------------------------------------------------------
    def scale_loss(self, loss):
        """loss * scale (a Tensor stays differentiable)."""
        return loss * self.dynamic_scale

    def step(self, weights) -> None:
        """Unscale and apply the gradients if all are finite, else skip and halve the scale."""
        weights = list(weights)
        if all(w.grad is None for w in weights):
            self.inner_optimizer.step(weights)          # the inner optimizer's error message
            return
        weights = [w for w in weights if w.grad is not None]
        if not all_finite([w.grad for w in weights]):
            self.step_counter = 0
            self.dynamic_scale /= 2.0
            return
        for w in weights:
            w.grad = w.grad / w.grad.dtype.type(self.dynamic_scale)
        self.inner_optimizer.step(weights)
        if self.step_counter == self.dynamic_growth_steps - 1:
            self.step_counter = 0
            self.dynamic_scale *= 2.0
        else:
            self.step_counter += 1

    # -- state and config ----------------------------------------------------------------------
    def build(self, weights) -> None:
        self.inner_optimizer.build(weights)

    def get_state(self) -> dict:
        """The inner optimizer's state plus ``loss_scale`` and ``loss_scale_steps``."""
        return {**self.inner_optimizer.get_state(), "loss_scale": float(self.dynamic_scale),
                "loss_scale_steps": int(self.step_counter)}

    def set_state(self, state) -> None:
        state = dict(state)
        scale, steps = state.pop("loss_scale", None), state.pop("loss_scale_steps", None)
        self.inner_optimizer.set_state(state)
        if scale is not None:
            self.dynamic_scale = float(scale)
        if steps is not None:
            self.step_counter = int(steps)

    def get_config(self) -> dict:
        from minicnn.optimizers import serialize
        return {"name": self.name, "inner_optimizer": serialize(self.inner_optimizer),
                "initial_scale": self.initial_scale,
                "dynamic_growth_steps": self.dynamic_growth_steps}

    @classmethod
    def from_config(cls, config):
        from minicnn.optimizers import get
        config = dict(config)
        return cls(get(config.pop("inner_optimizer")), **config)

    def __repr__(self):
        return (f"LossScaleOptimizer({self.inner_optimizer!r}, scale={self.dynamic_scale:g}, "
                f"steps={self.step_counter})")


def all_finite(arrays) -> bool:
    """True when no array holds an inf or a NaN; one read-back from the device for the lot."""
    arrays = list(arrays)
    if not arrays:
        return True
    xp = backend.get_array_module(*arrays)
    flags = xp.stack([xp.isfinite(a).all() for a in arrays])
    return bool(flags.all())


# =============================================================================== TF32 and presets
def enable_tensor_float_32_execution(enabled: bool) -> None:
    """Allow (True) or forbid (False, the default) TF32 tensor cores in float32 matrix products
    on the GPU; ``kernels.backend.set_tf32`` (inputs rounded to 10 mantissa bits: ~1e-3
    relative error instead of ~1e-6). No effect on the CPU."""
    backend.set_tf32(enabled)


def tensor_float_32_execution_enabled() -> bool:
    """Whether TF32 is allowed (``enable_tensor_float_32_execution``)."""
    return backend.tf32_enabled()


PRECISIONS = {                      # --precision: (global policy, TF32)
    "float32": ("float32", False),
    "tf32": ("float32", True),
    "bf16": ("mixed_bfloat16", False),
    "fp16": ("mixed_float16", False),
}


def set_precision(name: str) -> DTypePolicy:
    """Set the global policy and the TF32 switch for ``name`` in PRECISIONS (float32: strict
    float32; tf32: float32 with TF32 products; bf16: mixed_bfloat16; fp16: mixed_float16, with
    loss scaling by compile). Returns the policy."""
    if name not in PRECISIONS:
        raise ValueError(f"set_precision: precision must be one of {sorted(PRECISIONS)}, got "
                         f"{name!r}")
    policy, tf32 = PRECISIONS[name]
    policy = DTypePolicy(policy)
    set_global_policy(policy)
    enable_tensor_float_32_execution(tf32)
    return policy
