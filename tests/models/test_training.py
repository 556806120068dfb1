"""fit / evaluate / predict, callbacks, NaN guard, checkpoints and exact resume."""
import json

import numpy as np
import pytest

import minicnn as mc
from minicnn import callbacks, io, layers as kl, training
from minicnn.models import Model, Sequential, UNet, load_model


def small_data(rng, n=8, size=8):
    x = rng.random((n, size, size, 1)).astype(np.float32)
    y = (x[..., 0] > 0.5).astype(np.int64)
    return x, y


def small_model(dropout=0.0):
    inputs = kl.Input((8, 8, 1))
    h = kl.Conv2D(4, 3, padding="same")(inputs)
    h = kl.BatchNormalization()(h)
    h = kl.ReLU()(h)
    if dropout:
        h = kl.Dropout(dropout)(h)
    model = Model(inputs, kl.Conv2D(2, 1)(h))
    model.compile(mc.optimizers.Adam(1e-2),
                  mc.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["pixel_accuracy"])
    return model


def test_fit_returns_history_with_validation(rng):
    mc.seed(1)
    x, y = small_data(rng)
    model = small_model()
    history = model.fit(x, y, batch_size=4, epochs=3, validation_split=0.25, verbose=0)
    assert set(history.history) == {"loss", "pixel_accuracy", "val_loss", "val_pixel_accuracy"}
    assert len(history.history["loss"]) == 3
    logs = model.evaluate(x, y, batch_size=3, return_dict=True)
    assert 0.0 <= logs["pixel_accuracy"] <= 1.0
    assert model.predict(x, batch_size=3).shape == (8, 8, 8, 2)


def test_fit_accepts_a_generator(rng):
    x, y = small_data(rng)
    def batches():
        while True:
            yield x[:4], y[:4]
    history = small_model().fit(batches(), steps_per_epoch=3, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2


def test_batchnorm_and_dropout_differ_between_fit_and_predict(rng):
    x, _ = small_data(rng)
    model = small_model(dropout=0.5)
    a = model(x, training=True).numpy()
    b = model(x, training=False).numpy()
    c = model(x, training=False).numpy()
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(b, c)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(rng, tmp_path):
    x, y = small_data(rng)
    model = small_model()
    path = tmp_path / "ckpt.npz"
    model.fit(x, y, batch_size=4, epochs=1, verbose=0,
              callbacks=[callbacks.ModelCheckpoint(path, monitor="loss")])
    saved = io.read_npz(path)[0]
    x_bad = x.copy()
    x_bad[5] = np.nan
    with pytest.raises(training.NonFiniteLossError, match=r"step 2 .*last finite loss: \d"):
        model.fit(x_bad, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                  callbacks=[callbacks.ModelCheckpoint(path, monitor="loss")])
    after = io.read_npz(path)[0]
    assert saved.keys() == after.keys()
    for key in saved:
        np.testing.assert_array_equal(saved[key], after[key])


def test_save_and_load_give_identical_predictions(rng, tmp_path):
    x, y = small_data(rng)
    for model in (small_model(), UNet(2, base_filters=2, depth=2),
                  Sequential([kl.Conv2D(3, 3, padding="same"), kl.BatchNormalization(), kl.Conv2D(2, 1)])):
        model(x)
        path = tmp_path / f"{model.name}.npz"
        model.save(path)
        loaded = load_model(path)
        np.testing.assert_array_equal(model.predict(x), loaded.predict(x))


def test_interrupted_save_leaves_old_file_whole(rng, tmp_path, monkeypatch):
    x, _ = small_data(rng)
    model = small_model()
    model(x)
    path = tmp_path / "w.npz"
    model.save_weights(path)
    before = io.read_npz(path)[0]

    def explode(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", explode)
    for w in model.weights:
        w.data[...] += 1
    with pytest.raises(OSError, match="disk full"):
        model.save_weights(path)
    monkeypatch.undo()
    after = io.read_npz(path)[0]
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_load_weights_lists_every_mismatch(rng, tmp_path):
    a = UNet(2, base_filters=2, depth=2)
    a.build((None, 16, 16, 1))
    a.save_weights(tmp_path / "a.npz")
    b = UNet(2, base_filters=4, depth=2)
    b.build((None, 16, 16, 1))
    with pytest.raises(ValueError, match=r"problems\):\n  shape differs: encoder\[0\]/conv1/kernel"):
        b.load_weights(tmp_path / "a.npz")


def test_weights_file_is_not_a_pickle(rng, tmp_path):
    model = small_model()
    model(small_data(rng)[0])
    model.save_weights(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as data:
        manifest = json.loads(data["__manifest__"].tobytes())
    assert manifest["weights"][0]["name"] == "0_conv2d/kernel"


def test_resume_equals_uninterrupted(rng, tmp_path):
    x, y = small_data(rng, n=12)

    def run(epochs, resume_from=None):
        mc.seed(3)
        model = small_model(dropout=0.2)
        model(x[:1])
        start = 0
        if resume_from:
            start = io.load_checkpoint(resume_from, model)["epoch"]
        model.fit(x, y, batch_size=4, epochs=epochs, initial_epoch=start, verbose=0,
                  callbacks=[callbacks.ModelCheckpoint(tmp_path / "ck.npz", monitor="loss")])
        return model

    straight = run(4)
    run(2)
    resumed = run(4, resume_from=tmp_path / "ck.npz")
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_seed_makes_runs_identical(rng):
    x, y = small_data(rng)
    results = []
    for _ in range(2):
        mc.seed(11)
        model = small_model(dropout=0.3)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_callbacks_early_stopping_reduce_lr_csv(rng, tmp_path):
    x, y = small_data(rng)
    model = small_model()
    model.optimizer.learning_rate = 0.0   # nothing improves
    csv_path = tmp_path / "log.csv"
    plateau = callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=1.0)
    history = model.fit(x, y, batch_size=8, epochs=10, verbose=0, shuffle=False, callbacks=[
        callbacks.EarlyStopping(monitor="loss", patience=2, min_delta=1.0), plateau,
        callbacks.CSVLogger(csv_path)])
    assert len(history.history["loss"]) == 3
    lines = csv_path.read_text().strip().splitlines()
    assert lines[0] == ("epoch,learning_rate,loss,pixel_accuracy,"      # Keras: sorted, val_ added
                        "val_learning_rate,val_loss,val_pixel_accuracy") and len(lines) == 4
    assert history.history["learning_rate"] == [0.0, 0.0, 0.0]


def test_recompute_batchnorm_statistics_averages_batches(rng):
    model = small_model()
    batches = [rng.random((4, 8, 8, 1)).astype(np.float32) for _ in range(3)]
    used = training.recompute_batchnorm_statistics(model, batches)
    assert used == 3
    bn = training.batchnorm_layers(model)[0]
    conv = model.layers[0]
    means = [conv(b).numpy().mean(axis=(0, 1, 2)) for b in batches]
    np.testing.assert_allclose(bn.weights[2].numpy(), np.mean(means, axis=0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.99


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: m.fit(x, y, batch_size=0, verbose=0), "fit: batch_size must be a positive int"),
    (lambda m, x, y: m.fit(x, y, batch_size=2.5, verbose=0), "fit: batch_size"),
    (lambda m, x, y: m.fit(x, y, epochs=-1, verbose=0), "fit: epochs must be an int >= 0"),
    (lambda m, x, y: m.fit(x, y, steps_per_epoch=0, verbose=0), "fit: steps_per_epoch"),
    (lambda m, x, y: m.fit(x, y, validation_split=1.0, verbose=0), r"fit: validation_split"),
    (lambda m, x, y: m.fit(x[0], y[0], verbose=0), r"fit: x must be a batch of rank 4.*x\[None\]"),
    (lambda m, x, y: m.fit(x[:0], y[:0], verbose=0), "fit: x holds no samples"),
    (lambda m, x, y: m.fit(x, y[:3], verbose=0), "fit: x has 8 samples but y has 3"),
    (lambda m, x, y: m.predict(x, batch_size=-1), "predict: batch_size must be a positive int"),
    (lambda m, x, y: m.predict(x[0]), r"predict: x must be a batch of rank 4, .* got shape \(8, 8, 1\)"),
    (lambda m, x, y: m.evaluate(x, y, batch_size=0), "evaluate: batch_size"),
    (lambda m, x, y: m.evaluate(x[..., 0], y), "evaluate: x must be a batch of rank 4"),
])
def test_fit_predict_evaluate_name_the_bad_argument(rng, call, message):
    x, y = small_data(rng)
    with pytest.raises(ValueError, match=message):
        call(small_model(), x, y)


def test_rank_check_knows_sequential_and_unet_inputs(rng):
    x, _ = small_data(rng)
    for model in (UNet(2, base_filters=2, depth=1), Sequential([kl.Conv2D(2, 1)])):
        with pytest.raises(ValueError, match="predict: x must be a batch of rank 4"):
            model.predict(x[0])
    assert Sequential([kl.Dense(2)]).predict(x[:, 0, 0, :]).shape == (8, 2)   # rank 2 is fine


def test_bad_files_raise_value_error_naming_the_file(rng, tmp_path):
    model = small_model()
    good = tmp_path / "good.npz"
    model.save(good)
    payload = good.read_bytes()
    cases = {
        "empty.npz": (b"", "an empty file"),
        "truncated.npz": (payload[:len(payload) // 2], "truncated or corrupt"),
        "text.npz": (b"hello, world", "not a minicnn .npz file"),
        "hdf5.npz": (b"\x89HDF\r\n\x1a\n" + bytes(64), "an HDF5 file"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        for load in (load_model, model.load_weights, lambda p: io.load_checkpoint(p, model)):
            with pytest.raises(ValueError, match=expected) as info:
                load(tmp_path / name)
            assert name in str(info.value)
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object),
             __manifest__=np.frombuffer(b"{}", dtype=np.uint8))
    with pytest.raises(ValueError, match="Python objects") as info:
        load_model(tmp_path / "objects.npz")
    assert "allow_pickle" not in str(info.value)
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="foreign.npz is not a minicnn .npz file.*no '__manifest__'"):
        model.load_weights(tmp_path / "foreign.npz")
    with pytest.raises(ValueError, match="cannot tell the format of .*x.pt"):
        model.save_weights(tmp_path / "x.pt")


def test_a_failed_load_leaves_the_weights_unchanged(rng, tmp_path):
    a, b = UNet(2, base_filters=2, depth=2), UNet(2, base_filters=2, depth=2)
    for m in (a, b):
        m.build((None, 16, 16, 1))
    a.save_weights(tmp_path / "a.npz")
    arrays, manifest = io.read_npz(tmp_path / "a.npz")
    arrays.pop(sorted(arrays)[-1])                       # one weight missing
    io.write_npz_atomic(tmp_path / "broken.npz", arrays, manifest)
    before = b.get_weights()
    with pytest.raises(ValueError, match="1 problems"):
        b.load_weights(tmp_path / "broken.npz")
    for x, y in zip(before, b.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_functional_config_round_trips_with_keras_order(rng):
    inputs = kl.Input((8, 8, 1))
    a = kl.Conv2D(2, 3, padding="same", name="a")(inputs)
    b = kl.Conv2D(2, 1, name="b")(a)
    shared = kl.Conv2D(2, 1, name="shared")
    c = kl.Add(name="add")([shared(a), shared(b)])
    model = Model(inputs, c, name="net")
    config = model.get_config()
    assert [e["name"] for e in config["layers"]] == [inputs.name, "a", "b", "shared", "add"]
    assert [n["args"][0]["config"]["keras_history"] for n in config["layers"][3]["inbound_nodes"]] \
        == [["a", 0, 0], ["b", 0, 0]]
    assert config["input_layers"] == [inputs.name, 0, 0]
    rebuilt = Model.from_config(json.loads(json.dumps(config)))
    rebuilt.set_weights(model.get_weights())
    x, _ = small_data(rng)
    np.testing.assert_array_equal(rebuilt.predict(x), model.predict(x))
    assert [layer.name for layer in rebuilt.layers] == ["a", "b", "shared", "add"]
