"""Callbacks of ``fit``, with Keras 3's names, arguments and rules (``keras.callbacks``).

    Callback             the hooks: on_train_begin/end, on_epoch_begin/end(epoch, logs),
                         on_train_batch_begin/end(batch, logs), on_test_begin/end
    History              ``fit``'s return value: ``history.history[name]``, one value per epoch
                         (both defined in minicnn.training, beside the fit that calls them)
    ModelCheckpoint      save after each epoch (or only on improvement); the suffix of
                         ``filepath`` picks the format (.keras, .weights.h5, or minicnn's .npz
                         checkpoint with optimizer state, epoch and random state for --resume)
    EarlyStopping        stop when the monitored value stops improving
    ReduceLROnPlateau    multiply the learning rate by ``factor`` on a plateau
    CSVLogger            one CSV row per epoch
    TensorBoard          scalars (and, if asked, prediction images) for TensorBoard, through the
                         optional ``tensorboardX`` (``pip install "minicnn[tensorboard]"``)

"Improved" follows Keras' MonitorCallback: value - min_delta < best ('min') or
value + min_delta > best ('max'); mode 'auto' is 'min' for a loss and otherwise follows the
compiled metric's direction (every metric in minicnn.metrics grows as the model improves).
"""
from __future__ import annotations

import csv
import math
import os
import time
import warnings

import numpy as np

from kernels import backend
from minicnn import io, visualize
from minicnn.training import Callback, History  # noqa: F401  (fit's hooks live beside fit)


class _MonitorCallback(Callback):
    """Keras' MonitorCallback: which way ``monitor`` should move, and whether a value improved."""

    def __init__(self, monitor="val_loss", mode="auto", baseline=None, min_delta=0):
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"{type(self).__name__} mode '{mode}' is unknown, fallback to auto "
                          "mode.", stacklevel=3)
            mode = "auto"
        self.monitor, self.mode, self.best = monitor, mode, baseline
        self.min_delta = abs(min_delta)
        self.monitor_op = None

    def _set_monitor_op(self):
        if self.mode == "min" or (self.mode == "auto" and
                                  self.monitor.removeprefix("val_") == "loss"):
            self.monitor_op = np.less
        elif self.mode == "max":
            self.monitor_op = np.greater
        else:
            name = self.monitor.removeprefix("val_")
            for metric in getattr(self.model, "compiled_metrics", None) or []:
                if metric.name == name and hasattr(metric, "_direction"):
                    self.monitor_op = np.greater if metric._direction == "up" else np.less
            if self.monitor_op is None:
                raise ValueError(
                    f"{type(self).__name__} callback received monitor={self.monitor}, but "
                    "minicnn isn't able to automatically determine whether that metric should "
                    "be maximized or minimized. Pass `mode='max'` in order to monitor based on "
                    "the highest metric value, or pass `mode='min'` in order to use the lowest "
                    "value.")
        if self.monitor_op is np.less:
            self.min_delta = -abs(self.min_delta)

    def _is_improvement(self, value, reference) -> bool:
        if reference is None:
            return True
        return bool(self.monitor_op(value - self.min_delta, reference))


class ModelCheckpoint(_MonitorCallback):
    """Save the model after every epoch (``save_best_only``: only when ``monitor`` improved).

    filepath may hold ``{epoch}`` and any logged name (``"ck-{epoch:02d}-{val_loss:.2f}.keras"``).
    Its suffix picks what is written: ``.keras`` the whole model (Keras' zip), ``.weights.h5``
    Keras' weights file (``save_weights_only=True`` requires it, as Keras), ``.npz`` minicnn's
    checkpoint — weights, optimizer state, epoch and random state, what ``minicnn.io.
    load_checkpoint`` resumes from (or only the weights with ``save_weights_only``).
    """

    rank_zero_only = True         # under mpiexec, rank 0 alone writes

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 save_weights_only=False, mode="auto", save_freq="epoch",
                 initial_value_threshold=None):
        super().__init__(monitor, mode, initial_value_threshold)
        self.filepath = os.fspath(filepath)
        self.verbose, self.save_best_only = verbose, save_best_only
        self.save_weights_only = save_weights_only
        if save_freq != "epoch":
            raise ValueError(f"ModelCheckpoint: only save_freq='epoch' is supported, got "
                             f"{save_freq!r}")
        self.save_freq = save_freq
        allowed = (".weights.h5", ".npz") if save_weights_only else (".keras", ".npz")
        if not self.filepath.endswith(allowed):
            raise ValueError(f"ModelCheckpoint: with save_weights_only={save_weights_only} the "
                             f"filepath must end in {' or '.join(allowed)}, got "
                             f"filepath={self.filepath}")

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor_op is None:
            self._set_monitor_op()
        logs = logs or {}
        try:
            filepath = self.filepath.format(epoch=epoch + 1, **logs)
        except KeyError as error:
            raise KeyError(f'Failed to format this callback filepath: "{self.filepath}". '
                           f"Reason: {error}") from None
        if self._should_save(epoch, logs, filepath):
            self._save(filepath, epoch)

    def _should_save(self, epoch, logs, filepath) -> bool:
        if not self.save_best_only:
            if self.verbose > 0:
                print(f"\nEpoch {epoch + 1}: saving model to {filepath}")
            return True
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"Can save best model only with {self.monitor} available.",
                          stacklevel=3)
            return True
        best = "None" if self.best is None else f"{self.best:.5f}"
        if self._is_improvement(current, self.best):
            if self.verbose > 0:
                print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {best} to "
                      f"{current:.5f}, saving model to {filepath}")
            self.best = current
            return True
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best}")
        return False

    def _save(self, filepath, epoch):
        if filepath.endswith(".npz") and not self.save_weights_only:
            io.save_checkpoint(filepath, self.model, epoch=epoch + 1)
        elif self.save_weights_only:
            self.model.save_weights(filepath)
        else:
            self.model.save(filepath)


class EarlyStopping(_MonitorCallback):
    """Stop training when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs
    (never at epoch 0); ``restore_best_weights`` puts the best epoch's weights back at the end;
    ``baseline``: the wait only resets once the value also beats it."""

    def __init__(self, monitor="val_loss", min_delta=0, patience=0, verbose=0, mode="auto",
                 baseline=None, restore_best_weights=False, start_from_epoch=0):
        super().__init__(monitor, mode, min_delta=min_delta)
        self.patience, self.verbose, self.baseline = patience, verbose, baseline
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch
        self.wait, self.stopped_epoch, self.best_weights, self.best_epoch = 0, 0, None, 0

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best, self.best_weights, self.best_epoch = (
            0, 0, None, None, 0)

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor_op is None:
            self._set_monitor_op()
        current = (logs or {}).get(self.monitor)
        if current is None:
            warnings.warn(f"Early stopping conditioned on metric `{self.monitor}` which is not "
                          f"available. Available metrics are: {','.join(logs or {})}",
                          stacklevel=2)
            return
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = self.model.get_weights(), epoch
        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print(f"Restoring model weights from the end of the best epoch: "
                      f"{self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)


class ReduceLROnPlateau(_MonitorCallback):
    """After ``patience`` epochs without an improvement of ``min_delta``, learning rate <-
    max(learning rate * factor, min_lr), then ``cooldown`` epochs before counting again. Logs
    the current ``learning_rate`` each epoch, as Keras."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
                 min_delta=1e-4, cooldown=0, min_lr=0.0):
        super().__init__(monitor, mode, min_delta=min_delta)
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau does not support a factor >= 1.0. Received "
                             f"factor={factor}")
        self.factor, self.min_lr, self.patience = factor, min_lr, patience
        self.verbose, self.cooldown = verbose, cooldown
        self.cooldown_counter, self.wait = 0, 0

    def on_train_begin(self, logs=None):
        self.best, self.cooldown_counter, self.wait = None, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor_op is None:
            self._set_monitor_op()
        logs = logs if logs is not None else {}
        optimizer = self.model.optimizer
        logs["learning_rate"] = float(optimizer.current_learning_rate())
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"Learning rate reduction is conditioned on metric `{self.monitor}` "
                          f"which is not available. Available metrics are: {','.join(logs)}.",
                          stacklevel=2)
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best, self.wait = current, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = logs["learning_rate"]
                if old > np.float32(self.min_lr):
                    optimizer.learning_rate = max(old * self.factor, self.min_lr)
                    if self.verbose > 0:
                        print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate "
                              f"to {optimizer.learning_rate}.")
                    self.cooldown_counter, self.wait = self.cooldown, 0


class CSVLogger(Callback):
    """One row per epoch: ``epoch`` (from 0), then the logged values in sorted name order (and
    ``val_`` columns, "NA" when there is no validation), as Keras; ``append`` keeps the file."""

    rank_zero_only = True         # under mpiexec, rank 0 alone writes

    def __init__(self, filename, separator=",", append=False):
        self.filename, self.sep, self.append = os.fspath(filename), separator, append
        self.keys, self.writer, self.csv_file, self.append_header = None, None, None, True

    def on_train_begin(self, logs=None):
        if self.append and os.path.exists(self.filename):
            with open(self.filename) as handle:
                self.append_header = not handle.readline()
        folder = os.path.dirname(self.filename)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.csv_file = open(self.filename, "a" if self.append else "w", newline="")
        self.writer, self.keys = None, None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(key.startswith("val_") for key in self.keys):
                self.keys += [f"val_{key}" for key in self.keys]
        if self.writer is None:
            self.writer = csv.DictWriter(self.csv_file, fieldnames=["epoch"] + self.keys,
                                         delimiter=self.sep)
            if self.append_header:
                self.writer.writeheader()
        self.writer.writerow({"epoch": epoch, **{key: logs.get(key, "NA") for key in self.keys}})
        self.csv_file.flush()

    def on_train_end(self, logs=None):
        if self.csv_file is not None and not self.csv_file.closed:
            self.csv_file.close()
        self.writer = None


class TensorBoard(Callback):
    """Event files for TensorBoard in ``log_dir/train`` and ``log_dir/validation``, as Keras:
    ``epoch_<name>`` scalars each epoch (``val_`` values under validation/, without the prefix,
    and ``epoch_learning_rate``), ``batch_<name>`` every ``update_freq`` batches when it is
    "batch" or an int, weight histograms every ``histogram_freq`` epochs.

    prediction_images: (x, y) — a few images (N, H, W, C) and their integer masks (N, H, W) —
    draws "predictions/<i>" each epoch: image | true mask | predicted classes (minicnn, not
    Keras). Needs the optional ``tensorboardX`` package (``pip install "minicnn[tensorboard]"``);
    Keras' write_graph, write_images, profile_batch and embeddings are not written.
    """

    rank_zero_only = True         # under mpiexec, rank 0 alone writes

    def __init__(self, log_dir="logs", histogram_freq=0, write_graph=True, write_images=False,
                 write_steps_per_second=False, update_freq="epoch", profile_batch=0,
                 embeddings_freq=0, embeddings_metadata=None, prediction_images=None):
        for name, value in (("write_images", write_images), ("profile_batch", profile_batch),
                            ("embeddings_freq", embeddings_freq),
                            ("embeddings_metadata", embeddings_metadata)):
            if value:
                raise ValueError(f"TensorBoard: {name}={value!r} is not supported by minicnn "
                                 "(scalars, histograms and prediction_images are)")
        if update_freq not in ("epoch", "batch") and not (
                isinstance(update_freq, int) and update_freq >= 1):
            raise ValueError(f"TensorBoard: update_freq must be 'epoch', 'batch' or an int >= 1, "
                             f"got {update_freq!r}")
        if isinstance(histogram_freq, bool) or not isinstance(histogram_freq, int) or \
                histogram_freq < 0:
            raise ValueError(f"TensorBoard: histogram_freq must be an int >= 0, got "
                             f"{histogram_freq!r}")
        self.log_dir, self.histogram_freq = os.fspath(log_dir), histogram_freq
        self.write_graph, self.write_steps_per_second = write_graph, write_steps_per_second
        self.update_freq = 1 if update_freq == "batch" else update_freq
        self.prediction_images = _check_prediction_images(prediction_images)
        self._writers, self._global_batch = {}, 0
        self._epoch_started, self._epoch_batches = None, 0
        self._writer_class()                  # fail now, not after the first epoch

    @staticmethod
    def _writer_class():
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError('TensorBoard needs the tensorboardX package: pip install '
                              '"minicnn[tensorboard]" (or pip install tensorboardX)') from None
        return SummaryWriter

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = self._writer_class()(os.path.join(self.log_dir, run))
        return self._writers[run]

    def on_train_begin(self, logs=None):
        self._global_batch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()
        self._epoch_batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._global_batch += 1
        self._epoch_batches = batch + 1
        if self.update_freq == "epoch" or self._global_batch % self.update_freq:
            return
        writer = self._writer("train")
        for name, value in (logs or {}).items():
            writer.add_scalar(f"batch_{name}", float(value), self._global_batch)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        train = {k: v for k, v in logs.items() if not k.startswith("val_")}
        if "learning_rate" not in train and getattr(self.model, "optimizer", None) is not None:
            train["learning_rate"] = float(self.model.optimizer.current_learning_rate())
        if self.write_steps_per_second and self._epoch_started is not None:
            elapsed = time.perf_counter() - self._epoch_started
            train["steps_per_second"] = self._epoch_batches / max(elapsed, 1e-12)
        for run, values in (("train", train),
                            ("validation", {k[4:]: v for k, v in logs.items()
                                            if k.startswith("val_")})):
            for name, value in values.items():
                if isinstance(value, (int, float, np.floating, np.integer)) and \
                        math.isfinite(float(value)):
                    self._writer(run).add_scalar(f"epoch_{name}", float(value), epoch)
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            for weight in self.model.weights:
                self._writer("train").add_histogram(f"{weight.name}/histogram", weight.numpy(),
                                                    epoch)
        if self.prediction_images is not None:
            self._write_predictions(epoch)
        for writer in self._writers.values():
            writer.flush()

    def _write_predictions(self, epoch):
        images, masks = self.prediction_images
        scores = self.model.predict(images, batch_size=len(images))
        if scores.ndim != 4:
            raise ValueError(f"TensorBoard: prediction_images needs a model with per-pixel "
                             f"outputs (N, H, W, classes), got {scores.shape}")
        classes = scores.shape[-1]
        predicted = scores.argmax(axis=-1)
        low, high = float(images.min()), float(images.max())
        for i in range(len(images)):
            picture, _ = visualize._display_image(images[i], low, high)
            if picture.ndim == 2:
                picture = np.repeat(picture[..., None], 3, axis=-1)
            row = [picture] + ([] if masks is None else [visualize.colour_mask(masks[i], classes)])
            row.append(visualize.colour_mask(predicted[i], classes))
            row = [_fit(part, *predicted[i].shape) for part in row]
            self._writer("validation").add_image(f"predictions/{i}", np.concatenate(row, axis=1),
                                                 epoch, dataformats="HWC")

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def _check_prediction_images(value):
    """(images (N, H, W, C) float, masks (N, H, W) int or None), or None."""
    if value is None:
        return None
    images, masks = value if isinstance(value, (tuple, list)) else (value, None)
    images = np.asarray(backend.to_numpy(images))
    if images.ndim != 4:
        raise ValueError(f"TensorBoard: prediction_images must be images (N, H, W, C) or "
                         f"(images, masks), got images of shape {images.shape}")
    if masks is not None:
        masks = np.asarray(backend.to_numpy(masks))
        if masks.shape[:1] != images.shape[:1] or masks.ndim != 3:
            raise ValueError(f"TensorBoard: prediction_images masks must be (N, H, W) matching "
                             f"images {images.shape}, got {masks.shape}")
    return images, masks


def _fit(picture, height, width):
    """``picture`` (h, w, 3) centre-cropped to (height, width) (a 'valid' U-Net's output is
    smaller than its input)."""
    top, left = (picture.shape[0] - height) // 2, (picture.shape[1] - width) // 2
    return picture[top:top + height, left:left + width]
