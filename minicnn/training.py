"""compile / fit / evaluate / predict, the callback hooks and History, and the batch-norm
statistics re-estimate.

One training step is the explicit loop of the README, run for you::

    loss = loss_fn(y, model(x, training=True))
    model.zero_grad(); loss.backward()
    optimizer.step(model.trainable_weights)
"""
from __future__ import annotations

import math
import numbers
import time

import numpy as np
from tqdm.auto import tqdm

from kernels import backend
from minicnn import (distributed, losses, metrics as metrics_module, mixed_precision, optimizers,
                     rng)
from minicnn.layers.normalization import BatchNormalization
from minicnn.tensor import Tensor, no_grad


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite during training."""


# -- the hooks fit calls (the Keras-named callbacks are in minicnn.callbacks) -----------------------
class Callback:
    """Hooks called by ``fit``; ``self.model`` is the model being trained and ``self.params``
    holds ``{"epochs", "steps", "verbose"}``. ``logs`` are dicts of Python floats."""

    model = None
    params: dict = {}
    rank_zero_only = False     # under mpiexec, called on rank 0 only (callbacks that write files)

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None): pass
    def on_train_end(self, logs=None): pass
    def on_epoch_begin(self, epoch, logs=None): pass
    def on_epoch_end(self, epoch, logs=None): pass
    def on_batch_begin(self, batch, logs=None): pass
    def on_batch_end(self, batch, logs=None): pass
    def on_test_begin(self, logs=None): pass
    def on_test_end(self, logs=None): pass

    def on_train_batch_begin(self, batch, logs=None):
        self.on_batch_begin(batch, logs=logs)       # Keras' backward-compatible alias

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs=logs)


class History(Callback):
    """Records every epoch's logs: ``history.history[name]`` is a list, ``history.epoch`` the
    epoch numbers; ``fit`` adds one (last, so it sees what other callbacks log) and returns it."""

    def __init__(self):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def on_train_begin(self, logs=None):
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)
        self.model.history = self


# -- batches -------------------------------------------------------------------------------------
def _is_array(value) -> bool:
    return isinstance(value, (np.ndarray, Tensor)) or backend.is_gpu_array(value)


def _host(value):
    return value.data if isinstance(value, Tensor) else value


def array_batches(x, y, batch_size: int, shuffle: bool):
    """Slices of (x, y) of ``batch_size`` (the last may be smaller), in a shuffled order if asked."""
    n = len(x)
    order = rng.generator().permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        if not shuffle:
            index = slice(start, start + batch_size)
        yield x[index], (None if y is None else y[index])


def _read_back(scalars) -> list:
    """Python floats of 0-d arrays (the losses of the last steps), read from the device with one
    copy for the lot rather than one wait per value."""
    xp = backend.get_array_module(*scalars)
    if xp is np:
        return [float(v) for v in scalars]
    return backend.to_numpy(xp.stack(scalars)).tolist()


def _check_batch_size(batch_size, where: str):
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or \
            batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive int, got {batch_size!r}")


def _check_fit_arguments(batch_size, epochs, initial_epoch, steps_per_epoch, validation_split,
                         log_every):
    """ValueError naming the first of fit's numeric arguments that makes no sense."""
    _check_batch_size(batch_size, "fit")
    for name, value, low in (("epochs", epochs, 0), ("initial_epoch", initial_epoch, 0),
                             ("steps_per_epoch", steps_per_epoch, 1),
                             ("log_every", log_every, 1)):
        if value is None and name in ("steps_per_epoch", "log_every"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"fit: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(validation_split, numbers.Real) or not 0 <= validation_split < 1:
        raise ValueError(f"fit: validation_split must be in [0, 1), got {validation_split!r}")


def _check_xy(x, y, where: str):
    if y is not None and len(x) != len(y):
        raise ValueError(f"{where}: x has {len(x)} samples but y has {len(y)}")


# -- the training mix-in of Model ----------------------------------------------------------------
class Trainer:
    """compile / fit / evaluate / predict for ``Model``."""

    optimizer = None
    loss = None
    compiled_metrics: list = []
    stop_training = False

    def compile(self, optimizer="adam", loss=None, metrics=None, auto_scale_loss=True):
        """Choose the optimizer, the loss and the metrics (names or objects). As Keras, a model
        under the 'mixed_float16' policy gets its optimizer wrapped in a LossScaleOptimizer
        (unless ``auto_scale_loss=False``)."""
        self.optimizer = optimizers.get(optimizer)
        if auto_scale_loss and self.dtype_policy.name == "mixed_float16" and not isinstance(
                distributed.unwrapped(self.optimizer), mixed_precision.LossScaleOptimizer):
            self.optimizer = distributed.wrap_inside(self.optimizer,
                                                     mixed_precision.LossScaleOptimizer)
        if loss is None:
            raise ValueError("compile: a loss is needed, e.g. "
                             "losses.SparseCategoricalCrossentropy(from_logits=True)")
        self.loss = losses.get(loss)
        self.compiled_metrics = [metrics_module.get(m) for m in metrics or []]
        return self

    def _check_batch(self, x, where: str, name: str):
        """ValueError naming ``name`` unless x is a non-empty batch of the model's input rank."""
        if not hasattr(x, "ndim") or not hasattr(x, "shape"):
            raise TypeError(f"{where}: {name} must be an array (N, ...), got {type(x).__name__}")
        rank = self._input_rank()
        if rank is not None and x.ndim != rank:
            hint = (" (one image (H, W, C) needs a batch axis: x[None])" if x.ndim == rank - 1
                    else "")
            raise ValueError(f"{where}: {name} must be a batch of rank {rank}, e.g. (N, H, W, C) "
                             f"for images, got shape {tuple(x.shape)}{hint}")
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"{where}: {name} holds no samples (shape {tuple(x.shape)})")

    def _input_rank(self):
        """The rank the model's input must have, where it is known: a functional model's
        Input, the shape it was built for, a Sequential's first layer's or the model's own
        ``input_ndim``."""
        if getattr(self, "functional", False):
            return len(self.inputs[0].shape) if len(self.inputs) == 1 else None
        if isinstance(self.built_input_shape, tuple):
            return len(self.built_input_shape)
        first = self.stack[0] if getattr(self, "stack", None) else self   # Sequential
        return first.input_ndim

    def _require_compiled(self, what: str):
        if self.loss is None:
            raise RuntimeError(f"{what}: call model.compile(optimizer, loss, metrics) first")

    def _to_model_device(self, array, device=None):
        return backend.to_device(_host(array), self.device if device is None else device)

    def train_step(self, x, y, sample_weight=None):
        """One optimisation step on one batch; returns the loss Tensor (not read back)."""
        device = self.device
        x, y = self._to_model_device(x, device), self._to_model_device(y, device)
        if sample_weight is not None:
            sample_weight = self._to_model_device(sample_weight, device)
        output = self(x, training=True)
        loss = self.loss(y, output, sample_weight=sample_weight)
        self.zero_grad()
        scale_loss = getattr(self.optimizer, "scale_loss", None)    # LossScaleOptimizer
        if scale_loss is None:
            loss.backward()
        else:
            with np.errstate(over="ignore", invalid="ignore"):   # an overflow means: skip
                scale_loss(loss).backward()
        self.optimizer.step(self.trainable_weights)
        self._update_metrics(y, output)
        return loss

    def _update_metrics(self, y, output):
        for metric in self.compiled_metrics:
            metric.update_state(y, output.data)

    def _metric_logs(self, prefix="") -> dict:
        return {prefix + m.name: float(m.result()) for m in self.compiled_metrics}

    def _reset_metrics(self):
        for metric in self.compiled_metrics:
            metric.reset_state()

    def fit(self, x=None, y=None, batch_size=32, epochs=1, verbose=1, callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, initial_epoch=0,
            steps_per_epoch=None, log_every=None):
        """Train for ``epochs`` epochs; returns a History.

        x, y: arrays (N, H, W, C) and targets; or x an iterable of (x, y) batches (then
        ``steps_per_epoch`` bounds an endless one); or x a function ``epoch -> batches`` (each
        epoch its own, e.g. freshly seeded, stream). validation_data: (x_val, y_val).
        The running loss is read back from the device every ``log_every`` steps (1 on the CPU,
        10 on a GPU), which is also when a NaN loss is caught.
        """
        self._require_compiled("fit")
        _check_fit_arguments(batch_size, epochs, initial_epoch, steps_per_epoch,
                             validation_split, log_every)
        comm = distributed.communicator_of(self)   # several ranks: see minicnn.distributed
        if _is_array(x):
            x, y = _host(x), _host(y)
            self._check_batch(x, "fit", "x")
            _check_xy(x, y, "fit")
            if validation_split and validation_data is None:
                split = int(len(x) * (1 - validation_split))
                x, y, validation_data = x[:split], y[:split], (x[split:], y[split:])
            steps = math.ceil(len(x) / batch_size)
            make_batches = lambda epoch: array_batches(x, y, batch_size, shuffle)  # noqa: E731
            if comm is not None:                  # each rank its share of every batch
                make_batches, steps = distributed.sharded_array_batches(x, y, batch_size,
                                                                        shuffle, comm)
            steps = steps if steps_per_epoch is None else min(steps, steps_per_epoch)
        elif callable(x):                          # epoch -> that epoch's batches
            make_batches, steps = x, steps_per_epoch
        else:
            steps = steps_per_epoch
            if steps_per_epoch is None:           # a finite, re-iterable source: one pass each
                make_batches = lambda epoch: iter(x)  # noqa: E731
            else:                                 # an endless stream, shared by the epochs
                stream = iter(x)
                make_batches = lambda epoch: stream  # noqa: E731
        if log_every is None:
            log_every = 1 if self.device == "cpu" else 10

        callbacks = list(callbacks or [])
        if comm is not None and comm.rank != 0:   # rank 0 alone prints and writes files
            verbose = 0
            callbacks = [cb for cb in callbacks if not getattr(cb, "rank_zero_only", False)]
        history = next((cb for cb in callbacks if isinstance(cb, History)), None)
        if history is None:                # last, so it records what other callbacks log
            history = History()
            callbacks.append(history)
        for cb in callbacks:
            cb.set_model(self)
            cb.set_params({"verbose": verbose, "epochs": epochs, "steps": steps})
        self.stop_training = False
        self.history = history
        for cb in callbacks:
            cb.on_train_begin({})
        last_good = None
        global_step = 0
        logs = {}
        for epoch in range(initial_epoch, epochs):
            for cb in callbacks:
                cb.on_epoch_begin(epoch, {})
            self._reset_metrics()
            started = time.perf_counter()
            bar = tqdm(total=steps, desc=f"Epoch {epoch + 1}/{epochs}", leave=False,
                       disable=verbose != 1, dynamic_ncols=True)
            loss_sum, loss_count, pending, batch_logs = 0.0, 0, [], {}
            for step, batch in enumerate(make_batches(epoch)):
                if steps is not None and step >= steps:
                    break
                for cb in callbacks:
                    cb.on_train_batch_begin(step, batch_logs)
                xb, yb = batch[0], batch[1]
                sw = batch[2] if len(batch) > 2 else None
                if comm is not None and global_step == 0:     # start from rank 0's weights
                    distributed.broadcast_weights(self, comm, build_with=xb)
                pending.append(self.train_step(xb, yb, sw).data)
                if comm is not None:
                    distributed.average_moving_statistics(batchnorm_layers(self), comm)
                global_step += 1
                if len(pending) >= log_every:
                    values = _read_back(pending)
                    for offset, value in enumerate(values):
                        if not math.isfinite(value):
                            bad_step = global_step - len(values) + offset + 1
                            raise NonFiniteLossError(
                                f"fit: the loss became {value} at step {bad_step} (epoch "
                                f"{epoch + 1}); last finite loss: {last_good}. Lower the "
                                "learning rate or check the data; saved checkpoints are intact.")
                        last_good = value
                    loss_sum += sum(values)
                    loss_count += len(values)
                    pending = []
                    batch_logs = {"loss": loss_sum / loss_count, **self._metric_logs()}
                    bar.set_postfix({k: f"{v:.4f}" for k, v in batch_logs.items()})
                bar.update(1)
                for cb in callbacks:          # the running means as last read back
                    cb.on_train_batch_end(step, dict(batch_logs))
            if pending:
                values = _read_back(pending)
                if not all(math.isfinite(v) for v in values):
                    raise NonFiniteLossError(f"fit: the loss became non-finite in the last "
                                             f"{len(values)} steps of epoch {epoch + 1}; last "
                                             f"finite loss: {last_good}")
                loss_sum += sum(values)
                loss_count += len(values)
            bar.close()
            if comm is not None:                  # the loss and metrics of every rank's shares
                loss_sum, loss_count = distributed.reduce_epoch(self, comm, loss_sum, loss_count)
            logs = {"loss": loss_sum / max(loss_count, 1), **self._metric_logs()}
            if validation_data is not None:
                for cb in callbacks:
                    cb.on_test_begin({})
                val = self.evaluate(validation_data[0], validation_data[1],
                                    batch_size=batch_size, verbose=0, return_dict=True)
                for cb in callbacks:
                    cb.on_test_end(dict(val))
                logs.update({"val_" + k: v for k, v in val.items()})
            for cb in callbacks:             # callbacks may add entries (val scores, say)
                cb.on_epoch_end(epoch, logs)
            if verbose:
                elapsed = time.perf_counter() - started
                text = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                tqdm.write(f"Epoch {epoch + 1}/{epochs} - {elapsed:.1f}s - {text}")
            if self.stop_training:
                break
        for cb in callbacks:
            cb.on_train_end(dict(logs))
        return history

    def evaluate(self, x, y, batch_size=32, verbose=0, return_dict=False):
        """Loss and metrics over (x, y) in inference mode, batch-size weighted.

        The weighted sum of the losses stays on the model's device (float64) until the end.
        Under a DistributedOptimizer each rank scores its share and the sums are added up."""
        self._require_compiled("evaluate")
        _check_batch_size(batch_size, "evaluate")
        x, y = _host(x), _host(y)
        self._check_batch(x, "evaluate", "x")
        _check_xy(x, y, "evaluate")
        comm = distributed.communicator_of(self)
        if comm is not None and len(x) >= comm.size:
            lo, hi = distributed.shard_bounds(len(x), comm.rank, comm.size)
            x, y = x[lo:hi], y[lo:hi]
        else:
            comm = None
        saved = self.compiled_metrics
        self.compiled_metrics = [type(m).from_config(m.get_config()) for m in saved]
        device = self.device
        total, count = None, 0
        with no_grad():
            for xb, yb in array_batches(x, y, batch_size, shuffle=False):
                xb, yb = self._to_model_device(xb, device), self._to_model_device(yb, device)
                output = self(xb, training=False)
                weighted = self.loss(yb, output).data.astype(np.float64) * len(xb)
                total = weighted if total is None else total + weighted
                count += len(xb)
                self._update_metrics(yb, output)
        total = 0.0 if total is None else float(total)
        if comm is not None:
            total, count = distributed.reduce_epoch(self, comm, total, count)
        mean_loss = total / max(count, 1)
        logs = {"loss": mean_loss, **self._metric_logs()}
        self.compiled_metrics = saved
        if return_dict:
            return logs
        values = list(logs.values())
        return values[0] if len(values) == 1 else values

    def predict(self, x, batch_size=32, verbose=0):
        """The model's outputs for x, batched, in inference mode, as a NumPy array."""
        _check_batch_size(batch_size, "predict")
        x = _host(x)
        self._check_batch(x, "predict", "x")
        device = self.device
        outputs = []
        with no_grad():
            for xb, _ in array_batches(x, None, batch_size, shuffle=False):
                outputs.append(backend.to_numpy(self(self._to_model_device(xb, device)).data))
        return np.concatenate(outputs, axis=0)


# -- batch-norm statistics -----------------------------------------------------------------------
def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer inside ``model``, depth first."""
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, BatchNormalization):
            found.append(layer)
        stack.extend(reversed(layer.layers))
    return found


def recompute_batchnorm_statistics(model, batches) -> int:
    """Re-estimate every BN layer's moving mean and variance as the plain average of the batch
    statistics over ``batches`` (an iterable of input arrays), with the weights frozen.

    Keras' moving averages (momentum 0.99) lag behind fast-changing weights, so inference can
    score far below training; this replaces them with the population estimate of the current
    weights. Returns the number of batches used.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        with no_grad():
            for used, xb in enumerate(batches, start=1):
                for layer in layers:
                    layer.momentum = (used - 1) / used   # running mean of the batch statistics
                model(backend.to_device(_host(xb), model.device), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return used
