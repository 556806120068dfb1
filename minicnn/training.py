"""compile / fit / evaluate / predict, callbacks, and the batch-norm statistics re-estimate.

One training step is the explicit loop of the README, run for you::

    loss = loss_fn(y, model(x, training=True))
    model.zero_grad(); loss.backward()
    optimizer.step(model.trainable_weights)
"""
from __future__ import annotations

import csv
import math
import os
import time

import numpy as np

from kernels import backend
from minicnn import rng
from minicnn.tensor import Tensor, no_grad


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite during training."""


class History:
    """What ``fit`` returns: ``history.history[name]`` is a list with one value per epoch."""

    def __init__(self):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []

    def append(self, epoch: int, logs: dict) -> None:
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)


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

    def compile(self, optimizer="adam", loss=None, metrics=None):
        """Choose the optimizer, the loss and the metrics (names or objects)."""
        from minicnn import losses, metrics as metrics_module, optimizers
        self.optimizer = optimizers.get(optimizer)
        if loss is None:
            raise ValueError("compile: a loss is needed, e.g. "
                             "losses.SparseCategoricalCrossentropy(from_logits=True)")
        self.loss = losses.get(loss)
        self.compiled_metrics = [metrics_module.get(m) for m in metrics or []]
        return self

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
        loss.backward()
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
        from tqdm.auto import tqdm
        if _is_array(x):
            x, y = _host(x), _host(y)
            _check_xy(x, y, "fit")
            if validation_split and validation_data is None:
                split = int(len(x) * (1 - validation_split))
                x, y, validation_data = x[:split], y[:split], (x[split:], y[split:])
            steps = math.ceil(len(x) / batch_size)
            steps = steps if steps_per_epoch is None else min(steps, steps_per_epoch)
            make_batches = lambda epoch: array_batches(x, y, batch_size, shuffle)  # noqa: E731
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

        history = History()
        callbacks = list(callbacks or [])
        for cb in callbacks:
            cb.set_model(self)
        self.stop_training = False
        self.history = history
        for cb in callbacks:
            cb.on_train_begin()
        last_good = None
        global_step = 0
        for epoch in range(initial_epoch, epochs):
            for cb in callbacks:
                cb.on_epoch_begin(epoch)
            self._reset_metrics()
            started = time.perf_counter()
            bar = tqdm(total=steps, desc=f"Epoch {epoch + 1}/{epochs}", leave=False,
                       disable=verbose != 1, dynamic_ncols=True)
            loss_sum, loss_count, pending = 0.0, 0, []
            for step, batch in enumerate(make_batches(epoch)):
                if steps is not None and step >= steps:
                    break
                xb, yb = batch[0], batch[1]
                sw = batch[2] if len(batch) > 2 else None
                pending.append(self.train_step(xb, yb, sw).data)
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
                    bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}",
                                    **{k: f"{v:.4f}" for k, v in self._metric_logs().items()})
                bar.update(1)
                for cb in callbacks:
                    cb.on_batch_end(step)
            if pending:
                values = _read_back(pending)
                if not all(math.isfinite(v) for v in values):
                    raise NonFiniteLossError(f"fit: the loss became non-finite in the last "
                                             f"{len(values)} steps of epoch {epoch + 1}; last "
                                             f"finite loss: {last_good}")
                loss_sum += sum(values)
                loss_count += len(values)
            bar.close()
            logs = {"loss": loss_sum / max(loss_count, 1), **self._metric_logs()}
            if validation_data is not None:
                for cb in callbacks:
                    cb.on_validation_begin()
                val = self.evaluate(validation_data[0], validation_data[1],
                                    batch_size=batch_size, verbose=0, return_dict=True)
                logs.update({"val_" + k: v for k, v in val.items()})
            for cb in callbacks:             # callbacks may add entries (val scores, say)
                cb.on_epoch_end(epoch, logs)
            history.append(epoch, logs)
            if verbose:
                elapsed = time.perf_counter() - started
                text = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                tqdm.write(f"Epoch {epoch + 1}/{epochs} - {elapsed:.1f}s - {text}")
            if self.stop_training:
                break
        for cb in callbacks:
            cb.on_train_end()
        return history

    def evaluate(self, x, y, batch_size=32, verbose=0, return_dict=False):
        """Loss and metrics over (x, y) in inference mode, batch-size weighted.

        The weighted sum of the losses stays on the model's device (float64) until the end."""
        self._require_compiled("evaluate")
        x, y = _host(x), _host(y)
        _check_xy(x, y, "evaluate")
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
        mean_loss = 0.0 if total is None else float(total) / max(count, 1)
        logs = {"loss": mean_loss, **self._metric_logs()}
        self.compiled_metrics = saved
        if return_dict:
            return logs
        values = list(logs.values())
        return values[0] if len(values) == 1 else values

    def predict(self, x, batch_size=32, verbose=0):
        """The model's outputs for x, batched, in inference mode, as a NumPy array."""
        x = _host(x)
        device = self.device
        outputs = []
        with no_grad():
            for xb, _ in array_batches(x, None, batch_size, shuffle=False):
                outputs.append(backend.to_numpy(self(self._to_model_device(xb, device)).data))
        return np.concatenate(outputs, axis=0)


# -- batch-norm statistics -----------------------------------------------------------------------
def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer inside ``model``, depth first."""
    from minicnn.layers.normalization import BatchNormalization
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


# -- callbacks ------------------------------------------------------------------------------------
class Callback:
    """Hooks called by ``fit``; ``self.model`` is the model being trained."""

    model = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self): pass
    def on_epoch_begin(self, epoch): pass
    def on_batch_end(self, step): pass
    def on_validation_begin(self): pass
    def on_epoch_end(self, epoch, logs): pass
    def on_train_end(self): pass


class _Monitor:
    """Tracks the best value of a logged quantity ('min' for losses, 'max' otherwise)."""

    def __init__(self, monitor, mode, min_delta=0.0):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":
            mode = "min" if "loss" in monitor else "max"
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)
        self.best = math.inf if mode == "min" else -math.inf

    def value(self, logs):
        if self.monitor not in logs:
            raise KeyError(f"monitor {self.monitor!r} is not logged; logged: {sorted(logs)}")
        return logs[self.monitor]

    def improved(self, value) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class ModelCheckpoint(Callback):
    """Save a checkpoint (weights, optimizer state, epoch, random state) after each epoch, or
    only when ``monitor`` improves with ``save_best_only``. ``path`` may contain ``{epoch}``."""

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto", verbose=0):
        self.path, self.save_best_only, self.verbose = str(path), save_best_only, verbose
        self.tracker = _Monitor(monitor, mode)

    def on_epoch_end(self, epoch, logs):
        from minicnn.io import save_checkpoint
        if self.save_best_only:
            value = self.tracker.value(logs)
            if not self.tracker.improved(value):
                return
            self.tracker.best = value
        save_checkpoint(self.path.format(epoch=epoch + 1), self.model, epoch=epoch + 1)


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, mode="auto",
                 restore_best_weights=False):
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.patience, self.restore_best_weights = patience, restore_best_weights
        self.wait, self.best_weights, self.stopped_epoch = 0, None, None

    def on_train_begin(self):
        self.wait = 0

    def on_epoch_end(self, epoch, logs):
        value = self.tracker.value(logs)
        if self.tracker.improved(value):
            self.tracker.best, self.wait = value, 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience and epoch > 0:     # Keras' rule
            self.model.stop_training, self.stopped_epoch = True, epoch
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, mode="auto", min_delta=1e-4,
                 cooldown=0, min_lr=0.0):
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be < 1, got {factor}")
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.factor, self.patience, self.cooldown, self.min_lr = factor, patience, cooldown, min_lr
        self.wait, self.cooldown_left = 0, 0

    def on_epoch_end(self, epoch, logs):
        value = self.tracker.value(logs)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if self.tracker.improved(value):
            self.tracker.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience and self.cooldown_left == 0:
            optimizer = self.model.optimizer
            optimizer.learning_rate = max(float(optimizer.current_learning_rate()) * self.factor,
                                          self.min_lr)
            self.wait, self.cooldown_left = 0, self.cooldown


class CSVLogger(Callback):
    """Append one row per epoch (epoch, then every logged value) to a CSV file."""

    def __init__(self, filename, separator=",", append=False):
        self.filename, self.separator, self.append = str(filename), separator, append
        self.keys = None

    def on_train_begin(self):
        if not self.append and os.path.exists(self.filename):
            os.remove(self.filename)

    def on_epoch_end(self, epoch, logs):
        new = not os.path.exists(self.filename)
        if self.keys is None:
            self.keys = list(logs)
        with open(self.filename, "a", newline="") as handle:
            writer = csv.writer(handle, delimiter=self.separator)
            if new:
                writer.writerow(["epoch"] + self.keys)
            writer.writerow([epoch] + [logs.get(k, "") for k in self.keys])
