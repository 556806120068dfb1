"""Optimizers and learning-rate schedules with Keras 3 semantics (``keras.optimizers``).

``opt.step(weights)`` updates each weight's ``.data`` in place from its ``.grad`` (weights whose
grad is None are skipped), in the weight's dtype, on NumPy or CuPy arrays alike. One step is,
as in Keras' ``BaseOptimizer.apply``:

    1. gradients cast to the weight dtype, then clipped (``clipnorm`` per weight, or
       ``global_clipnorm`` over all of them, or ``clipvalue`` element-wise);
    2. decoupled weight decay, when ``weight_decay`` is set:  w <- w - w * weight_decay * lr;
    3. the optimizer's update rule with lr = learning_rate(iterations)  (step 0 first);
    4. iterations <- iterations + 1.

``learning_rate`` is a float, a ``LearningRateSchedule`` or any callable of the iteration count
(Keras also takes a callable of no argument; here it receives the step).

State (``get_state()`` / ``set_state()``) is a flat dict of NumPy arrays and scalars:
``"iterations"``, ``"learning_rate"`` (when it is a float) and one array per slot and weight,
``"<slot>/<i>"`` with the Keras slot names (``momentum``, ``velocity``, ``velocity_hat``,
``average_gradient``) and ``i`` the weight's position in the list first given to ``step``
(or ``build``), so a checkpoint saves it with ``np.savez`` and training resumes exactly.
"""
from __future__ import annotations

import bisect
import math
import numbers
import types

import numpy as np

from kernels import backend
from kernels.cuda import adam as fused_adam
from minicnn.registry import Configurable


# =============================================================================== schedules

class LearningRateSchedule(Configurable):
    """Base class: ``schedule(step) -> float`` for the optimizer step count (0, 1, 2 ...)."""

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step)")



def _check_positive_steps(who, name, value):
    if not isinstance(value, numbers.Real) or value <= 0:
        raise ValueError(f"{who}: {name} must be > 0, got {name}={value!r}")


class ExponentialDecay(LearningRateSchedule):
    """lr(step) = initial_learning_rate * decay_rate ** (step / decay_steps)  (Keras).

    With ``staircase=True`` the exponent is floor(step / decay_steps).
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        _check_positive_steps(type(self).__name__, "decay_steps", decay_steps)
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.decay_rate = float(decay_rate)
        self.staircase = bool(staircase)

    def __call__(self, step):
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate ** p

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "staircase": self.staircase}


class StepDecay(ExponentialDecay):
    """lr(step) = initial_learning_rate * decay_rate ** floor(step / decay_steps).

    ExponentialDecay with ``staircase=True`` by default (PyTorch's ``StepLR(step_size, gamma)``,
    counted in optimizer steps, not epochs).
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=True):
        super().__init__(initial_learning_rate, decay_steps, decay_rate, staircase)


class PiecewiseConstantDecay(LearningRateSchedule):
    """values[0] for step <= boundaries[0], values[i] for boundaries[i-1] < step <= boundaries[i],
    values[-1] for step > boundaries[-1]  (Keras)."""

    def __init__(self, boundaries, values):
        boundaries, values = list(boundaries), [float(v) for v in values]
        if len(boundaries) != len(values) - 1:
            raise ValueError(f"PiecewiseConstantDecay: boundaries must have one element less than "
                             f"values, got {len(boundaries)} boundaries and {len(values)} values")
        if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
            raise ValueError(f"PiecewiseConstantDecay: boundaries must increase strictly, "
                             f"got {boundaries}")
        self.boundaries = boundaries
        self.values = values

    def __call__(self, step):
        return self.values[bisect.bisect_left(self.boundaries, step)]

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values}


class CosineDecay(LearningRateSchedule):
    """Cosine decay with optional linear warm-up (Keras 3; Loshchilov & Hutter 2016).

    Without ``warmup_target``:  s = min(step, decay_steps),
        lr = initial_learning_rate * ((1 - alpha) * 0.5 * (1 + cos(pi * s / decay_steps)) + alpha).
    With ``warmup_target``: for step < warmup_steps,
        lr = initial_learning_rate + (warmup_target - initial_learning_rate) * step / warmup_steps;
    then the decay above from ``warmup_target`` with s = min(step - warmup_steps, decay_steps).
    """

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, warmup_target=None,
                 warmup_steps=0):
        _check_positive_steps("CosineDecay", "decay_steps", decay_steps)
        if warmup_steps < 0:
            raise ValueError(f"CosineDecay: warmup_steps must be >= 0, got warmup_steps={warmup_steps}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.alpha = float(alpha)
        self.warmup_target = None if warmup_target is None else float(warmup_target)
        self.warmup_steps = warmup_steps

    def _decayed(self, step, start):
        fraction = min(step, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
        return start * ((1.0 - self.alpha) * cosine + self.alpha)

    def __call__(self, step):
        if self.warmup_target is None:
            return self._decayed(step, self.initial_learning_rate)
        if step < self.warmup_steps:
            delta = self.warmup_target - self.initial_learning_rate
            return self.initial_learning_rate + delta * (step / self.warmup_steps)
        return self._decayed(step - self.warmup_steps, self.warmup_target)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "alpha": self.alpha, "warmup_target": self.warmup_target,
                "warmup_steps": self.warmup_steps}


class LinearWarmup(LearningRateSchedule):
    """Linear warm-up in front of a float or a schedule ``after``.

    For step < warmup_steps:  lr = initial + (target - initial) * step / warmup_steps, where
    target = after(0) (or ``after`` itself when it is a float); then lr = after(step - warmup_steps),
    so the wrapped schedule starts its own count when the warm-up ends (as CosineDecay's warm-up).
    """

    def __init__(self, after, warmup_steps, initial_learning_rate=0.0):
        _check_positive_steps("LinearWarmup", "warmup_steps", warmup_steps)
        if not (callable(after) or isinstance(after, numbers.Real)):
            raise TypeError(f"LinearWarmup: after must be a float or a schedule, got {after!r}")
        self.after = after if callable(after) else float(after)
        self.warmup_steps = warmup_steps
        self.initial_learning_rate = float(initial_learning_rate)

    def _after(self, step):
        return self.after(step) if callable(self.after) else self.after

    def __call__(self, step):
        if step < self.warmup_steps:
            target = self._after(0)
            return self.initial_learning_rate + (target - self.initial_learning_rate) * (
                step / self.warmup_steps)
        return self._after(step - self.warmup_steps)

    def get_config(self):
        after = serialize_schedule(self.after) if callable(self.after) else self.after
        return {"after": after, "warmup_steps": self.warmup_steps,
                "initial_learning_rate": self.initial_learning_rate}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["after"], dict):
            config["after"] = deserialize_schedule(config["after"])
        return cls(**config)


def warmup(after, warmup_steps, initial_learning_rate=0.0):
    """``LinearWarmup(after, warmup_steps, initial_learning_rate)``: linear warm-up then ``after``."""
    return LinearWarmup(after, warmup_steps, initial_learning_rate)


_SCHEDULES = {cls.__name__: cls for cls in (ExponentialDecay, StepDecay, PiecewiseConstantDecay,
                                           CosineDecay, LinearWarmup)}


def serialize_schedule(schedule):
    """``{"class_name": ..., "config": {...}}`` for a built-in schedule."""
    name = type(schedule).__name__
    if _SCHEDULES.get(name) is not type(schedule):
        raise ValueError(f"serialize_schedule: cannot serialize the custom schedule {schedule!r}")
    return {"class_name": name, "config": schedule.get_config()}


def deserialize_schedule(config):
    """The schedule described by ``{"class_name": ..., "config": {...}}``."""
    cls = _SCHEDULES.get(config.get("class_name"))
    if cls is None:
        raise ValueError(f"deserialize_schedule: unknown schedule {config.get('class_name')!r}; "
                         f"known: {sorted(_SCHEDULES)}")
    return cls.from_config(dict(config.get("config") or {}))


# Keras' namespace: ``optimizers.schedules.CosineDecay`` ...
schedules = types.SimpleNamespace(
    LearningRateSchedule=LearningRateSchedule, ExponentialDecay=ExponentialDecay,
    StepDecay=StepDecay, PiecewiseConstantDecay=PiecewiseConstantDecay, CosineDecay=CosineDecay,
    LinearWarmup=LinearWarmup, warmup=warmup, serialize=serialize_schedule,
    deserialize=deserialize_schedule)


# =============================================================================== base optimizer

def _squared_norm(g) -> float:
    xp = backend.get_array_module(g)
    flat = g.ravel()
    return float(xp.dot(flat, flat))


def _optional_positive(who, name, value):
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{who}: {name} must be a non-negative float or None, got {name}={value!r}")
    return float(value)


class Optimizer:
    """Base of the optimizers (Keras ``BaseOptimizer``): clipping, weight decay, state, schedule.

    Subclasses give ``slot_names()`` (the per-weight arrays they keep) and
    ``update(w, g, slots, lr)``, which changes the array ``w`` in place from the gradient ``g``.
    """

    def __init__(self, learning_rate, weight_decay=None, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, name=None):
        who = type(self).__name__
        self.name = name or who.lower()
        self.weight_decay = _optional_positive(who, "weight_decay", weight_decay)
        self.clipnorm = _optional_positive(who, "clipnorm", clipnorm)
        self.clipvalue = _optional_positive(who, "clipvalue", clipvalue)
        self.global_clipnorm = _optional_positive(who, "global_clipnorm", global_clipnorm)
        if sum(c is not None for c in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError(f"{who}: only one of clipnorm, clipvalue and global_clipnorm can be set, "
                             f"got clipnorm={clipnorm}, clipvalue={clipvalue}, "
                             f"global_clipnorm={global_clipnorm}")
        self._learning_rate = None
        self.learning_rate = learning_rate
        self.iterations = 0
        self._weights = []          # registered weights, in first-seen order (kept alive: ids stay unique)
        self._index = {}            # id(weight) -> position in _weights
        self._slots = []            # one {slot name: array} per registered weight
        self._pending_slots = None  # slot arrays from set_state() before the weights are known
        self._no_decay_ids = set()
        self._no_decay_names = ()

    # -- learning rate ------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The learning rate of the next step: the float, or schedule(iterations)."""
        return self._learning_rate_at(self.iterations)

    @learning_rate.setter
    def learning_rate(self, value):
        who = type(self).__name__
        if callable(value):
            self._learning_rate = value
            return
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{who}: learning_rate must be a float, a LearningRateSchedule or a "
                            f"callable of the step, got {value!r}")
        if self._learning_rate is not None and callable(self._learning_rate):
            raise TypeError(f"{who}: this optimizer's learning_rate is a schedule "
                            f"({self._learning_rate!r}); it cannot be set to a float")
        self._learning_rate = float(value)

    def current_learning_rate(self) -> float:
        """The learning rate of the next step (the same as the ``learning_rate`` property)."""
        return self._learning_rate_at(self.iterations)

    def _learning_rate_at(self, step) -> float:
        lr = self._learning_rate
        return float(lr(step)) if callable(lr) else lr

    # -- weights and slots --------------------------------------------------------------------
    def slot_names(self) -> tuple:
        """Names of the per-weight arrays this optimizer keeps (Keras' variable names)."""
        return ()

    def build(self, weights) -> None:
        """Register ``weights`` (in this order) and create their zero slots; ``step`` calls it."""
        seen = set()
        for w in weights:
            key = id(w)
            if key in seen:
                raise ValueError(f"{type(self).__name__}.step: the same weight appears twice in the "
                                 f"list (shape {tuple(w.data.shape)})")
            seen.add(key)
            if key not in self._index:
                xp = backend.get_array_module(w.data)
                self._index[key] = len(self._weights)
                self._weights.append(w)
                self._slots.append({name: xp.zeros_like(w.data) for name in self.slot_names()})
        if self._pending_slots is not None and self._weights:
            pending, self._pending_slots = self._pending_slots, None
            self._load_slots(pending)

    def exclude_from_weight_decay(self, var_list=None, var_names=None) -> None:
        """Skip weight decay for these weights, or for weights whose ``.name`` contains one of
        ``var_names`` (Keras' method of the same name)."""
        self._no_decay_ids = {id(w) for w in (var_list or ())}
        self._no_decay_names = tuple(var_names or ())

    def _decays(self, w) -> bool:
        if id(w) in self._no_decay_ids:
            return False
        name = getattr(w, "name", None) or ""
        return not any(part in name for part in self._no_decay_names)

    # -- one step -----------------------------------------------------------------------------
    def step(self, weights) -> None:
        """Update every weight with a gradient, in place, then count one iteration."""
        weights = list(weights)
        if not weights:
            return
        self.build(weights)
        who = type(self).__name__
        live = [w for w in weights if w.grad is not None]
        if not live:
            raise ValueError(f"{who}.step: no gradient for any of the {len(weights)} weights "
                             "(did you call loss.backward()?)")
        grads = []
        for w in live:
            g = w.grad
            if g.shape != w.data.shape:
                raise ValueError(f"{who}.step: gradient of shape {tuple(g.shape)} for weight "
                                 f"{self._index[id(w)]} of shape {tuple(w.data.shape)}")
            if g.dtype != w.data.dtype:
                g = g.astype(w.data.dtype)
            grads.append(g)
        grads = self._clip(grads)
        lr = self.learning_rate
        if self.weight_decay:
            for w in live:
                if self._decays(w):
                    w.data -= w.data * (self.weight_decay * lr)
        self.apply_updates(live, grads, lr)
        self.iterations += 1

    def apply_updates(self, weights, grads, lr) -> None:
        """The update rule on each weight, ``update(w, g, slots, lr)`` one by one (Adam runs
        them all in one CUDA launch on a GPU)."""
        for w, g in zip(weights, grads):
            self.update(w.data, g, self._slots_of(w), lr)

    def _clip(self, grads):
        """Keras' _clip_gradients: per-weight norm, global norm, or value."""
        if self.clipnorm:
            clipped = []
            for g in grads:
                norm = math.sqrt(_squared_norm(g))
                clipped.append(g * (self.clipnorm / norm) if norm > self.clipnorm else g)
            return clipped
        if self.global_clipnorm:
            norm = math.sqrt(sum(_squared_norm(g) for g in grads))
            if not math.isfinite(norm):     # Keras: a non-finite norm makes every gradient NaN
                return [g * math.nan for g in grads]
            if norm <= self.global_clipnorm:
                return grads
            return [g * (self.global_clipnorm / norm) for g in grads]
        if self.clipvalue:
            xp = backend.get_array_module(*grads)
            return [xp.clip(g, -self.clipvalue, self.clipvalue) for g in grads]
        return grads

    def _slots_of(self, w) -> dict:
        """The slots of ``w``, moved to its device if the weight has moved since."""
        slots = self._slots[self._index[id(w)]]
        on_gpu = backend.is_gpu_array(w.data)
        for name, array in slots.items():
            if backend.is_gpu_array(array) != on_gpu:
                slots[name] = backend.to_device(array, backend.device_of(w.data))
        return slots

    def update(self, w, g, slots, lr) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement update(w, g, slots, lr)")

    # -- state --------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """{"iterations", ["learning_rate"], "<slot>/<i>": array} with host (NumPy) copies."""
        state = {"iterations": int(self.iterations)}
        if not callable(self._learning_rate):
            state["learning_rate"] = self._learning_rate
        for i, slots in enumerate(self._slots):
            for name, array in slots.items():
                state[f"{name}/{i}"] = np.array(backend.to_numpy(array))
        if self._pending_slots is not None:
            state.update({k: v.copy() for k, v in self._pending_slots.items()})
        return state

    def set_state(self, state) -> None:
        """Restore ``get_state()``'s dict (values may be 0-d arrays, as np.load gives them).

        A float learning rate in the state replaces the current one (Keras restores its
        learning-rate variable too); a schedule is kept and read at the restored iterations.
        Before the first step the slots wait until the weights are known."""
        who = type(self).__name__
        if "iterations" not in state:
            raise ValueError(f"{who}.set_state: the state has no 'iterations' entry; "
                             f"keys: {sorted(state)}")
        slots = {}
        for key, value in state.items():
            if key in ("iterations", "learning_rate"):
                continue
            name, _, index = key.rpartition("/")
            if name not in self.slot_names() or not index.isdigit():
                raise ValueError(f"{who}.set_state: unexpected entry {key!r}; this optimizer keeps "
                                 f"the slots {self.slot_names()} as '<slot>/<index>'")
            slots[key] = np.array(backend.to_numpy(value))
        indices = {int(k.rpartition("/")[2]) for k in slots}
        for i in indices:
            for name in self.slot_names():
                if f"{name}/{i}" not in slots:
                    raise ValueError(f"{who}.set_state: entry '{name}/{i}' is missing")
        if self._weights:
            self._load_slots(slots)
        else:
            self._pending_slots = slots
        self.iterations = int(state["iterations"])
        if "learning_rate" in state and not callable(self._learning_rate):
            self._learning_rate = float(state["learning_rate"])

    def _load_slots(self, slots) -> None:
        who = type(self).__name__
        count = len({k.rpartition("/")[2] for k in slots})
        if self.slot_names() and count != len(self._weights):
            raise ValueError(f"{who}.set_state: the state holds slots for {count} weights, "
                             f"the optimizer has {len(self._weights)}")
        for key, value in slots.items():
            name, _, index = key.rpartition("/")
            target = self._slots[int(index)][name]
            if value.shape != target.shape:
                raise ValueError(f"{who}.set_state: '{key}' has shape {value.shape}, weight "
                                 f"{index} has shape {tuple(target.shape)}")
            self._slots[int(index)][name] = backend.to_device(
                value.astype(target.dtype), backend.device_of(target))

    # -- config -------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor's arguments (JSON-able; a built-in schedule as a dict)."""
        lr = self._learning_rate
        if callable(lr):
            lr = serialize_schedule(lr)
        return {"name": self.name, "learning_rate": lr, "weight_decay": self.weight_decay,
                "clipnorm": self.clipnorm, "clipvalue": self.clipvalue,
                "global_clipnorm": self.global_clipnorm}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = deserialize_schedule(config["learning_rate"])
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(learning_rate={self._learning_rate!r})"


# =============================================================================== optimizers

class SGD(Optimizer):
    """Gradient descent with optional (Nesterov) momentum, Keras 3 ``SGD``.

        momentum == 0:  w <- w - lr * g
        otherwise:      v <- momentum * v - lr * g;   w <- w + v
        nesterov:       v <- momentum * v - lr * g;   w <- w + momentum * v - lr * g

    Slot: ``momentum`` (the velocity v) when momentum != 0.
    PyTorch keeps b <- momentum * b + g and steps w <- w - lr * b (no dampening): the same
    trajectory at a constant lr, but it scales the whole buffer by the current lr, Keras only the
    new gradient, so they differ once the lr changes; PyTorch also adds weight_decay * w to the
    gradient (L2) where Keras decays the weight (decoupled).
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None,
                 clipnorm=None, clipvalue=None, global_clipnorm=None, name="SGD"):
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, name)
        if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SGD: momentum must be a float in [0, 1], got momentum={momentum!r}")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def slot_names(self):
        return ("momentum",) if self.momentum != 0 else ()

    def update(self, w, g, slots, lr):
        lr_g = g * lr
        if self.momentum == 0:
            w -= lr_g
            return
        v = slots["momentum"]
        v *= self.momentum
        v -= lr_g
        if self.nesterov:
            lead = v * self.momentum
            lead -= lr_g
            w += lead
        else:
            w += v

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (Kingma & Ba 2014), Keras 3 ``Adam``. With t = iterations + 1:

        m <- m + (g - m) * (1 - beta_1)
        v <- v + (g^2 - v) * (1 - beta_2)
        (amsgrad: v_hat <- max(v_hat, v), and v_hat replaces v below)
        alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
        w <- w - alpha * m / (sqrt(v) + epsilon)

    Slots: ``momentum`` (m), ``velocity`` (v), ``velocity_hat`` (amsgrad).
    epsilon is Kingma & Ba's "epsilon hat": it is added to sqrt(v) *before* bias correction, i.e.
    PyTorch's ``lr * m_hat / (sqrt(v_hat) + eps)`` with eps scaled by sqrt(1 - beta_2^t); the
    defaults differ too (Keras 1e-7, PyTorch 1e-8).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 name="adam"):
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, name)
        who = type(self).__name__
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"{who}: {arg} must be a float in [0, 1), got {arg}={value!r}")
        if not isinstance(epsilon, numbers.Real) or epsilon < 0:
            raise ValueError(f"{who}: epsilon must be a non-negative float, got epsilon={epsilon!r}")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.amsgrad = bool(amsgrad)

    def slot_names(self):
        return ("momentum", "velocity", "velocity_hat") if self.amsgrad else ("momentum", "velocity")

    def apply_updates(self, weights, grads, lr) -> None:
        """On the GPU (CuPy float32/float64 weights, no amsgrad), every weight in ONE launch of
        ``kernels.cuda.adam`` (the same step as ``update``); otherwise one ``update`` each."""
        slots = [self._slots_of(w) for w in weights]
        updated = [w.data for w in weights] + [s[name] for s in slots
                                               for name in ("momentum", "velocity")]
        if self.amsgrad or not backend.is_gpu_array(updated[0]) or \
                not backend.cuda_kernels_enabled(*updated, *grads) or \
                len({a.dtype for a in updated + list(grads)}) != 1 or \
                not all(a.flags.c_contiguous for a in updated):
            super().apply_updates(weights, grads, lr)
            return
        xp = backend.get_array_module(updated[0])
        fused_adam.adam_update_gpu([w.data for w in weights],
                                   [xp.ascontiguousarray(g) for g in grads],
                                   [s["momentum"] for s in slots], [s["velocity"] for s in slots],
                                   lr, self.beta_1, self.beta_2, self.epsilon,
                                   self.iterations + 1)

    def update(self, w, g, slots, lr):
        xp = backend.get_array_module(w)
        t = self.iterations + 1
        alpha = lr * math.sqrt(1.0 - self.beta_2 ** t) / (1.0 - self.beta_1 ** t)
        m, v = slots["momentum"], slots["velocity"]
        scratch = g - m                       # the one temporary, reused below
        scratch *= 1.0 - self.beta_1
        m += scratch
        xp.multiply(g, g, out=scratch)
        scratch -= v
        scratch *= 1.0 - self.beta_2
        v += scratch
        if self.amsgrad:
            v_hat = slots["velocity_hat"]
            xp.maximum(v_hat, v, out=v_hat)
            v = v_hat
        xp.sqrt(v, out=scratch)
        scratch += self.epsilon
        xp.divide(m, scratch, out=scratch)
        scratch *= alpha
        w -= scratch

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, "amsgrad": self.amsgrad}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), Keras 3 ``AdamW``:
    before each Adam step  w <- w - w * weight_decay * lr  (default weight_decay=0.004).

    PyTorch's AdamW decays the same way, w <- w * (1 - lr * weight_decay), but defaults to
    weight_decay=0.01 and eps=1e-8 (added after bias correction, see Adam).
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 name="adamw"):
        if weight_decay is None:
            raise ValueError("AdamW: weight_decay must be a float, got weight_decay=None")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay, clipnorm,
                         clipvalue, global_clipnorm, name)


class RMSprop(Optimizer):
    """RMSprop (Hinton 2012), Keras 3 ``RMSprop``:

        v <- rho * v + (1 - rho) * g^2
        centered:  a <- rho * a + (1 - rho) * g;   d = v - a^2 + epsilon,  else d = v + epsilon
        step = lr * g / sqrt(d)
        momentum > 0:  s <- momentum * s + step;   w <- w - s,   else w <- w - step

    Slots: ``velocity`` (v), ``momentum`` (s, when momentum > 0), ``average_gradient`` (a, centered).
    epsilon is inside the square root; PyTorch adds it outside (sqrt(v) + eps), defaults
    alpha(=rho)=0.99 and eps=1e-8.
    """

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 name="rmsprop"):
        super().__init__(learning_rate, weight_decay, clipnorm, clipvalue, global_clipnorm, name)
        if not isinstance(rho, numbers.Real) or not 0.0 <= rho <= 1.0:
            raise ValueError(f"RMSprop: rho must be a float in [0, 1], got rho={rho!r}")
        if not isinstance(momentum, numbers.Real) or momentum < 0:
            raise ValueError(f"RMSprop: momentum must be a float >= 0, got momentum={momentum!r}")
        if not isinstance(epsilon, numbers.Real) or epsilon < 0:
            raise ValueError(f"RMSprop: epsilon must be a non-negative float, got epsilon={epsilon!r}")
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.centered = bool(centered)

    def slot_names(self):
        names = ("velocity",)
        if self.momentum > 0:
            names += ("momentum",)
        if self.centered:
            names += ("average_gradient",)
        return names

    def update(self, w, g, slots, lr):
        xp = backend.get_array_module(w)
        rho = self.rho
        v = slots["velocity"]
        v *= rho
        scratch = g * g                       # the one temporary, reused below
        scratch *= 1.0 - rho
        v += scratch
        if self.centered:
            a = slots["average_gradient"]
            a *= rho
            xp.multiply(g, 1.0 - rho, out=scratch)
            a += scratch
            xp.multiply(a, a, out=scratch)
            xp.subtract(v, scratch, out=scratch)
            scratch += self.epsilon
        else:
            xp.add(v, self.epsilon, out=scratch)
        xp.sqrt(scratch, out=scratch)
        xp.divide(g, scratch, out=scratch)
        scratch *= lr
        if self.momentum > 0:
            s = slots["momentum"]
            s *= self.momentum
            s += scratch
            w -= s
        else:
            w -= scratch

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "momentum": self.momentum,
                "epsilon": self.epsilon, "centered": self.centered}


# =============================================================================== lookup

_OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def serialize(optimizer) -> dict:
    """``{"class_name": ..., "config": {...}}`` for a built-in optimizer."""
    name = type(optimizer).__name__
    if _OPTIMIZERS.get(name.lower()) is not type(optimizer):
        raise ValueError(f"optimizers.serialize: cannot serialize the custom optimizer {optimizer!r}")
    return {"class_name": name, "config": optimizer.get_config()}


def get(identifier, learning_rate=None):
    """An optimizer from a name ("sgd", "adam", "adamw", "rmsprop", any case), a
    ``{"class_name", "config"}`` dict, a class or an instance. ``learning_rate``, when given,
    replaces the default (or the instance's learning rate)."""
    if isinstance(identifier, Optimizer):
        if learning_rate is not None:
            identifier.learning_rate = learning_rate
        return identifier
    kwargs = {} if learning_rate is None else {"learning_rate": learning_rate}
    if isinstance(identifier, str):
        cls = _OPTIMIZERS.get(identifier.lower())
        if cls is None:
            raise ValueError(f"optimizers.get: unknown optimizer {identifier!r}; "
                             f"known names: {sorted(_OPTIMIZERS)}")
        return cls(**kwargs)
    if isinstance(identifier, dict):
        cls = _OPTIMIZERS.get(str(identifier.get("class_name", "")).lower())
        if cls is None:
            raise ValueError(f"optimizers.get: unknown optimizer {identifier.get('class_name')!r}; "
                             f"known names: {sorted(_OPTIMIZERS)}")
        return cls.from_config({**(identifier.get("config") or {}), **kwargs})
    if isinstance(identifier, type) and issubclass(identifier, Optimizer):
        return identifier(**kwargs)
    raise TypeError(f"optimizers.get: cannot interpret {identifier!r} (type "
                    f"{type(identifier).__name__}) as an optimizer")
