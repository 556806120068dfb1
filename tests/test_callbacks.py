"""minicnn.callbacks against Keras 3's rules (keras/src/callbacks/*.py), epoch by epoch.

The expected sequences are worked out by hand from Keras' update rules, written next to each
test; a stand-in model records what the callback does to it.
"""
import csv
import struct

import numpy as np
import pytest

import minicnn as mc
from minicnn import callbacks as C
from minicnn import io, layers as kl


class FakeOptimizer:
    def __init__(self, learning_rate):
        self.learning_rate = learning_rate

    def current_learning_rate(self):
        return self.learning_rate


class FakeModel:
    """What the callbacks touch: stop_training, weights, optimizer, compiled metrics."""

    def __init__(self, metrics=()):
        self.stop_training = False
        self.weights_now = [np.zeros(1)]
        self.restored = None
        self.optimizer = FakeOptimizer(1.0)
        self.compiled_metrics = list(metrics)

    def get_weights(self):
        return [w.copy() for w in self.weights_now]

    def set_weights(self, values):
        self.restored = values


def run_epochs(callback, values, monitor="loss", model=None, weights=None):
    """Feed ``values`` (one per epoch) to ``callback``; returns the model and the epoch at which
    it asked to stop (None if it never did)."""
    model = model or FakeModel()
    callback.set_model(model)
    callback.on_train_begin({})
    stopped = None
    for epoch, value in enumerate(values):
        if weights is not None:
            model.weights_now = [np.array([weights[epoch]])]
        callback.on_epoch_end(epoch, {monitor: value})
        if model.stop_training:
            stopped = epoch
            break
    callback.on_train_end({})
    return model, stopped


# -- EarlyStopping ---------------------------------------------------------------------------------
def test_early_stopping_counts_patience_as_keras():
    # best 1.0 (e0), 0.9 (e1, wait 0); e2 0.95 wait 1; e3 0.91 wait 2 >= patience 2 -> stop at 3
    _, stopped = run_epochs(C.EarlyStopping(monitor="loss", patience=2), [1.0, 0.9, 0.95, 0.91, 0.5])
    assert stopped == 3


def test_early_stopping_min_delta_and_never_at_epoch_zero():
    # min_delta 0.2: 0.9 is not < 1.0 - 0.2, so no improvement from e1 on; patience 0 stops at
    # the first epoch > 0 (Keras never stops at epoch 0)
    _, stopped = run_epochs(C.EarlyStopping(monitor="loss", min_delta=0.2), [1.0, 0.9, 0.85])
    assert stopped == 1
    _, stopped = run_epochs(C.EarlyStopping(monitor="loss", min_delta=0.05), [1.0, 0.9, 0.89])
    assert stopped == 2


def test_early_stopping_restores_best_weights_at_train_end():
    model, stopped = run_epochs(C.EarlyStopping(monitor="loss", patience=1,
                                                restore_best_weights=True),
                                [3.0, 1.0, 2.0, 0.5], weights=[10, 11, 12, 13])
    assert stopped == 2
    assert model.restored[0][0] == 11            # the weights of epoch 1, the best


def test_early_stopping_baseline_keeps_counting_until_beaten():
    # baseline 0.5 is never beaten, so an improvement updates best but does not reset the wait
    # (Keras' rule): wait 1, 2 at e0, e1; e2 does not improve, wait 3 >= 2 -> stop. Without the
    # baseline the wait resets at e0, e1 and is 1 at e2.
    values = [1.0, 0.9, 0.95]
    _, stopped = run_epochs(C.EarlyStopping(monitor="loss", patience=2, baseline=0.5), values)
    assert stopped == 2
    _, stopped = run_epochs(C.EarlyStopping(monitor="loss", patience=2), values)
    assert stopped is None
    # while it keeps improving it never stops, baseline or not (the check is on a non-improvement)
    _, stopped = run_epochs(C.EarlyStopping(monitor="loss", patience=1, baseline=0.5),
                            [1.0, 0.9, 0.8, 0.7])
    assert stopped is None


def test_early_stopping_start_from_epoch_and_missing_monitor_warns():
    _, stopped = run_epochs(C.EarlyStopping(monitor="loss", start_from_epoch=3),
                            [1.0, 2.0, 3.0, 4.0, 5.0])
    assert stopped == 4
    with pytest.warns(UserWarning, match="val_loss.*not available"):
        _, stopped = run_epochs(C.EarlyStopping(), [1.0, 2.0])
    assert stopped is None


def test_monitor_direction_auto_follows_the_metric():
    metric = mc.metrics.get("pixel_accuracy")
    model = FakeModel(metrics=[metric])
    # accuracy is maximised: 0.5 -> 0.6 improves, 0.55 does not
    _, stopped = run_epochs(C.EarlyStopping(monitor="val_pixel_accuracy"), [0.5, 0.6, 0.55],
                            monitor="val_pixel_accuracy", model=model)
    assert stopped == 2
    with pytest.raises(ValueError, match="mode='max'"):
        run_epochs(C.EarlyStopping(monitor="val_something"), [1.0], monitor="val_something")
    _, stopped = run_epochs(C.EarlyStopping(monitor="score", mode="max"), [1.0, 0.5],
                            monitor="score")
    assert stopped == 1


# -- ReduceLROnPlateau ------------------------------------------------------------------------------
def test_reduce_lr_on_plateau_with_cooldown_as_keras():
    # factor 0.5, patience 1, cooldown 2, min_delta 0. e0: best 1.0. e1: no improvement, wait 1 ->
    # lr 0.5, cooldown counter 2. e2: counter 1 (wait 0), still cooling down: not counted. e3:
    # counter 0, no longer cooling down: wait 1 -> lr 0.25, counter 2. e4: 0.1 improves.
    # (Keras decrements before it checks, so cooldown=1 would not skip any epoch.)
    callback = C.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, cooldown=2, min_delta=0)
    model = FakeModel()
    callback.set_model(model)
    callback.on_train_begin({})
    rates, logged = [], []
    for epoch, value in enumerate([1.0, 1.0, 1.0, 1.0, 0.1]):
        logs = {"loss": value}
        callback.on_epoch_end(epoch, logs)
        logged.append(logs["learning_rate"])
        rates.append(model.optimizer.learning_rate)
    assert rates == [1.0, 0.5, 0.5, 0.25, 0.25]
    assert logged == [1.0, 1.0, 0.5, 0.5, 0.25]      # the rate the epoch ran with


def test_reduce_lr_min_lr_and_factor_check():
    callback = C.ReduceLROnPlateau(monitor="loss", factor=0.1, patience=0, min_lr=0.3)
    model, _ = run_epochs(callback, [1.0, 2.0, 2.0])
    assert model.optimizer.learning_rate == 0.3
    with pytest.raises(ValueError, match="factor >= 1.0"):
        C.ReduceLROnPlateau(factor=1.0)


# -- CSVLogger ----------------------------------------------------------------------------------------
def test_csv_logger_sorted_columns_na_validation_and_append(tmp_path):
    path = tmp_path / "log.csv"
    for append in (False, True):
        logger = C.CSVLogger(path, append=append)
        logger.on_train_begin({})
        logger.on_epoch_end(0, {"loss": 0.5, "acc": 0.25})
        logger.on_epoch_end(1, {"loss": 0.4, "acc": 0.5})
        logger.on_train_end({})
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["epoch", "acc", "loss", "val_acc", "val_loss"]
    assert rows[1] == ["0", "0.25", "0.5", "NA", "NA"]
    assert len(rows) == 5 and rows[3][0] == "0"       # appended, without a second header


# -- ModelCheckpoint ------------------------------------------------------------------------------------
def small_model():
    inputs = kl.Input((4, 4, 1))
    model = mc.Model(inputs, kl.Conv2D(2, 1)(inputs))
    model.compile("adam", mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_model_checkpoint_best_only_formats_the_path(tmp_path):
    model = small_model()
    callback = C.ModelCheckpoint(tmp_path / "ck-{epoch:02d}-{loss:.1f}.npz", monitor="loss",
                                 save_best_only=True)
    callback.set_model(model)
    for epoch, loss in enumerate([2.0, 1.0, 1.5, 0.5]):
        callback.on_epoch_end(epoch, {"loss": loss})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ck-01-2.0.npz", "ck-02-1.0.npz", "ck-04-0.5.npz"]
    assert io.read_npz(tmp_path / "ck-04-0.5.npz")[1]["epoch"] == 4     # a resumable checkpoint


def test_model_checkpoint_weights_only_and_suffix_rules(tmp_path):
    model = small_model()
    callback = C.ModelCheckpoint(tmp_path / "w.npz", save_weights_only=True)
    callback.set_model(model)
    callback.on_epoch_end(0, {"val_loss": 1.0})
    arrays, manifest = io.read_npz(tmp_path / "w.npz")
    assert "epoch" not in manifest and len(arrays) == 2
    with pytest.raises(ValueError, match=r"must end in \.weights\.h5 or \.npz"):
        C.ModelCheckpoint(tmp_path / "w.keras", save_weights_only=True)
    with pytest.raises(ValueError, match=r"must end in \.keras or \.npz"):
        C.ModelCheckpoint(tmp_path / "m.h5")
    with pytest.raises(KeyError, match="Failed to format"):
        bad = C.ModelCheckpoint(tmp_path / "{nope}.npz")
        bad.set_model(model)
        bad.on_epoch_end(0, {"val_loss": 1.0})


# -- fit: History last, the hooks in Keras' order -----------------------------------------------------
class Recorder(C.Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, logs=None): self.calls.append("train_begin")
    def on_epoch_begin(self, epoch, logs=None): self.calls.append(f"epoch_begin {epoch}")
    def on_train_batch_begin(self, batch, logs=None): self.calls.append(f"batch_begin {batch}")
    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(f"batch_end {batch} {sorted(logs)}")
    def on_test_begin(self, logs=None): self.calls.append("test_begin")
    def on_test_end(self, logs=None): self.calls.append("test_end")
    def on_epoch_end(self, epoch, logs=None): self.calls.append(f"epoch_end {epoch}")
    def on_train_end(self, logs=None): self.calls.append(f"train_end {sorted(logs)}")


def test_fit_calls_the_hooks_in_order_and_history_sees_learning_rate(rng):
    model = small_model()
    x = rng.random((4, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 2, (4, 4, 4))
    recorder = Recorder()
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0, validation_data=(x, y),
                        callbacks=[recorder, C.ReduceLROnPlateau(monitor="loss")])
    assert recorder.calls == ["train_begin", "epoch_begin 0", "batch_begin 0",
                              "batch_end 0 ['loss']", "batch_begin 1", "batch_end 1 ['loss']",
                              "test_begin", "test_end", "epoch_end 0",
                              "train_end ['learning_rate', 'loss', 'val_loss']"]
    assert history.history["learning_rate"] == [pytest.approx(1e-3)]
    assert recorder.params == {"verbose": 0, "epochs": 1, "steps": 2}


# -- TensorBoard --------------------------------------------------------------------------------------
def read_events(folder):
    """(tag, step, value-or-image) of every summary in the event files under ``folder``."""
    from tensorboardX.proto import event_pb2
    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                found.append((value.tag, event.step,
                              value.simple_value if kind == "simple_value" else value.image))
    return found


def test_tensorboard_writes_keras_scalars_and_prediction_images(rng, tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoard needs the optional tensorboardX")
    model = small_model()
    x = rng.random((4, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 2, (4, 4, 4))
    board = C.TensorBoard(tmp_path / "tb", update_freq="batch", histogram_freq=1,
                          prediction_images=(x[:2], y[:2]))
    history = model.fit(x, y, batch_size=2, epochs=2, verbose=0, validation_data=(x, y),
                        callbacks=[board])
    train = read_events(tmp_path / "tb" / "train")
    scalars = {(tag, step): v for tag, step, v in train if isinstance(v, float)}
    for epoch in range(2):
        assert scalars[("epoch_loss", epoch)] == pytest.approx(history.history["loss"][epoch])
        assert scalars[("epoch_learning_rate", epoch)] == pytest.approx(1e-3)
    assert sorted(step for tag, step in scalars if tag == "batch_loss") == [1, 2, 3, 4]
    assert any(tag.endswith("/histogram") for tag, _, _ in train)
    validation = read_events(tmp_path / "tb" / "validation")
    val = {(tag, step): v for tag, step, v in validation if isinstance(v, float)}
    assert val[("epoch_loss", 1)] == pytest.approx(history.history["val_loss"][1])
    images = [(tag, v) for tag, _, v in validation if tag.startswith("predictions/")]
    assert len(images) == 4
    assert (images[0][1].height, images[0][1].width) == (4, 12)     # image | truth | prediction
    assert images[0][1].encoded_image_string.startswith(b"\x89PNG")


def test_tensorboard_rejects_what_it_cannot_write(tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoard needs the optional tensorboardX")
    with pytest.raises(ValueError, match="write_images"):
        C.TensorBoard(tmp_path, write_images=True)
    with pytest.raises(ValueError, match="update_freq"):
        C.TensorBoard(tmp_path, update_freq=0)
    with pytest.raises(ValueError, match=r"prediction_images must be images \(N, H, W, C\)"):
        C.TensorBoard(tmp_path, prediction_images=np.zeros((4, 4, 1)))
