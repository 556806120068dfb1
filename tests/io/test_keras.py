"""Keras 3 files: the tests write them with h5py in Keras' layout (see minicnn.io.keras), no
Keras needed. The group paths below were read off files Keras 3.15 wrote (h5py visititems)."""
import io
import json
import zipfile

import numpy as np
import pytest

import minicnn as mc
from minicnn import layers as kl
from minicnn.io import keras as K

h5py = pytest.importorskip("h5py", reason="Keras files need the optional h5py (test extra)")


def write_h5(path, groups: dict, extra=None):
    """groups: {'layers/conv2d': [kernel, bias], ...} -> datasets <group>/vars/<i>."""
    with h5py.File(path, "w") as f:
        f.create_group("vars")                                   # the model's own (empty)
        for group, arrays in groups.items():
            g = f.create_group(f"{group}/vars")
            for i, a in enumerate(arrays):
                g[str(i)] = a
        for name, array in (extra or {}).items():
            f[name] = array


def random(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def randomize(model, rng):
    """Random weights, positive variances: every weight shows in the outputs."""
    model.set_weights([random(rng, *w.shape) for w in model.get_weights()])
    for w in model.weights:
        if w.name.endswith("moving_variance"):
            w.data[...] = np.abs(w.data) + 0.5


def functional(rng):
    inputs = kl.Input((8, 8, 3))
    a = kl.Conv2D(4, 3, padding="same")(inputs)
    b = kl.BatchNormalization()(a)
    c = kl.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(b)
    d = kl.SeparableConv2D(4, 3, padding="same")(c)
    e = kl.Add()([a, d])
    u = kl.Conv2DTranspose(4, 2, strides=2)(kl.MaxPooling2D(2)(e))
    f = kl.Conv2D(2, 1)(kl.Concatenate()([u, e]))
    return mc.Model(inputs, kl.Dense(3)(kl.GlobalAveragePooling2D()(f)))


def keras_arrays(rng):
    """What Keras writes for ``functional``: class-name paths with _1 for the second Conv2D."""
    return {
        "layers/conv2d": [random(rng, 3, 3, 3, 4), random(rng, 4)],
        "layers/batch_normalization": [random(rng, 4), random(rng, 4), random(rng, 4),
                                       np.abs(random(rng, 4)) + 0.5],
        "layers/depthwise_conv2d": [random(rng, 3, 3, 4, 2), random(rng, 8)],
        "layers/separable_conv2d": [random(rng, 3, 3, 8, 1), random(rng, 1, 1, 8, 4),
                                    random(rng, 4)],
        "layers/conv2d_transpose": [random(rng, 2, 2, 4, 4), random(rng, 4)],
        "layers/conv2d_1": [random(rng, 1, 1, 8, 2), random(rng, 2)],
        "layers/dense": [random(rng, 2, 3), random(rng, 3)],
    }


def test_keras_weights_land_in_the_layers_keras_names(rng, tmp_path):
    arrays = keras_arrays(rng)
    write_h5(tmp_path / "m.weights.h5", arrays, extra={"optimizer/vars/0": np.int32(3)})
    model = functional(rng)
    model.load_weights(tmp_path / "m.weights.h5")
    by_class = {}
    for layer in model.layers:
        by_class.setdefault(type(layer).__name__, []).append(layer)
    expected = {"conv2d": by_class["Conv2D"][0], "batch_normalization":
                by_class["BatchNormalization"][0], "depthwise_conv2d": by_class["DepthwiseConv2D"][0],
                "separable_conv2d": by_class["SeparableConv2D"][0],
                "conv2d_transpose": by_class["Conv2DTranspose"][0],
                "conv2d_1": by_class["Conv2D"][1], "dense": by_class["Dense"][0]}
    for group, layer in expected.items():
        for got, want in zip(layer.get_weights(), arrays[f"layers/{group}"]):
            np.testing.assert_array_equal(got, want)


def test_dense_and_batchnorm_outputs_follow_keras_formulas(rng, tmp_path):
    inputs = kl.Input((5,))
    model = mc.Model(inputs, kl.Dense(3)(kl.BatchNormalization()(inputs)))
    gamma, beta, mean, var = (random(rng, 5), random(rng, 5), random(rng, 5),
                              np.abs(random(rng, 5)) + 0.1)
    kernel, bias = random(rng, 5, 3), random(rng, 3)
    write_h5(tmp_path / "d.weights.h5", {"layers/batch_normalization": [gamma, beta, mean, var],
                                         "layers/dense": [kernel, bias]})
    model.load_weights(tmp_path / "d.weights.h5")
    x = random(rng, 4, 5)
    normalised = gamma * (x - mean) / np.sqrt(var + 1e-3) + beta      # Keras' epsilon 1e-3
    np.testing.assert_allclose(model.predict(x), normalised @ kernel + bias, rtol=1e-5, atol=1e-5)


def test_paths_of_sequential_nested_and_subclassed_models():
    seq = mc.Sequential([kl.Conv2D(3, 3), kl.BatchNormalization(), kl.Flatten(), kl.Dense(2)])
    seq.build((None, 8, 8, 2))
    assert [p for p, _ in K.weight_paths(seq)] == [
        "layers/conv2d", "layers/batch_normalization", "layers/dense"]   # no InputLayer
    inputs = kl.Input((8, 8, 2))
    inner = mc.Sequential([kl.Conv2D(3, 3, padding="same"), kl.ReLU()])
    nested = mc.Model(inputs, kl.Conv2D(2, 1)(inner(inputs)))
    assert [p for p, _ in K.weight_paths(nested)] == [
        "layers/sequential/layers/conv2d", "layers/conv2d"]
    unet = mc.models.UNet(2, base_filters=2, depth=1, padding="valid")
    unet.build((None, 20, 20, 1))
    # a subclassed model: attributes in sorted order; the transposed convolution sits in `ups`,
    # which sorts after `layers`, so Keras finds it first in Model.layers
    assert [p for p, _ in K.weight_paths(unet)] == [
        "bottleneck/bn1", "bottleneck/bn2", "bottleneck/conv1", "bottleneck/conv2",
        "decoder/conv_block/bn1", "decoder/conv_block/bn2", "decoder/conv_block/conv1",
        "decoder/conv_block/conv2", "encoder/conv_block/bn1", "encoder/conv_block/bn2",
        "encoder/conv_block/conv1", "encoder/conv_block/conv2", "head",
        "layers/conv2d_transpose"]


def test_save_weights_writes_keras_layout_and_round_trips(rng, tmp_path):
    model = functional(rng)
    randomize(model, rng)
    model.save_weights(tmp_path / "w.weights.h5")
    with h5py.File(tmp_path / "w.weights.h5") as f:
        second_conv = [layer for layer in model.layers if type(layer) is kl.Conv2D][1]
        np.testing.assert_array_equal(f["layers/conv2d_1/vars/0"][()], second_conv.kernel.numpy())
        assert f["layers/batch_normalization/vars"].attrs["name"] == model.layers[1].name
        assert len(f["layers/batch_normalization/vars"]) == 4
    twin = functional(rng)
    twin.load_weights(tmp_path / "w.weights.h5")
    x = rng.random((2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(twin.predict(x), model.predict(x))


def test_mismatches_are_all_listed_and_nothing_is_written(rng, tmp_path):
    arrays = keras_arrays(rng)
    arrays["layers/conv2d_1"][0] = random(rng, 1, 1, 8, 5)             # wrong shape
    del arrays["layers/dense"]                                          # missing
    arrays["layers/extra"] = [random(rng, 3)]                           # not in the model
    write_h5(tmp_path / "bad.weights.h5", arrays)
    model = functional(rng)
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"3 problems") as info:
        model.load_weights(tmp_path / "bad.weights.h5")
    message = str(info.value)
    assert "shape differs: layers/conv2d_1/vars/0" in message
    assert "missing in" in message and "layers/dense/vars (Dense" in message
    assert "not in the model: layers/extra/vars/0 (3,)" in message
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def keras_config(rng):
    """A .keras config.json as Keras 3.15 writes it (policies, initializer dicts, build_config,
    mask/training kwargs), for Input -> Conv2D -> BN -> Dropout -> [Concatenate with input]."""
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
              "registered_name": None, "shared_object_id": 1}
    init = {"module": "keras.initializers", "class_name": "GlorotUniform",
            "config": {"seed": None}, "registered_name": None}

    def tensor(name, shape):
        return {"class_name": "__keras_tensor__",
                "config": {"shape": shape, "dtype": "float32", "keras_history": [name, 0, 0]}}
    layers = [
        {"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
         "config": {"batch_shape": [None, 6, 6, 2], "dtype": "float32", "sparse": False,
                    "ragged": False, "name": "input_layer", "optional": False},
         "name": "input_layer", "inbound_nodes": []},
        {"module": "keras.layers", "class_name": "Conv2D", "registered_name": None,
         "config": {"name": "conv2d", "trainable": True, "dtype": policy, "filters": 3,
                    "kernel_size": [3, 3], "strides": [1, 1], "padding": "same",
                    "data_format": "channels_last", "dilation_rate": [1, 1], "groups": 1,
                    "activation": "relu", "use_bias": True, "kernel_initializer": init,
                    "bias_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                         "config": {}, "registered_name": None},
                    "kernel_regularizer": None, "bias_regularizer": None,
                    "activity_regularizer": None, "kernel_constraint": None,
                    "bias_constraint": None},
         "build_config": {"input_shape": [None, 6, 6, 2]}, "name": "conv2d",
         "inbound_nodes": [{"args": [tensor("input_layer", [None, 6, 6, 2])], "kwargs": {}}]},
        {"module": "keras.layers", "class_name": "BatchNormalization", "registered_name": None,
         "config": {"name": "batch_normalization", "trainable": True, "dtype": policy,
                    "axis": -1, "momentum": 0.99, "epsilon": 0.001, "center": True,
                    "scale": True, "beta_initializer": init, "gamma_initializer": init,
                    "moving_mean_initializer": init, "moving_variance_initializer": init,
                    "beta_regularizer": None, "gamma_regularizer": None,
                    "beta_constraint": None, "gamma_constraint": None, "synchronized": False,
                    "renorm": False, "renorm_clipping": None, "renorm_momentum": 0.99},
         "name": "batch_normalization",
         "inbound_nodes": [{"args": [tensor("conv2d", [None, 6, 6, 3])],
                            "kwargs": {"mask": None}}]},
        {"module": "keras.layers", "class_name": "Dropout", "registered_name": None,
         "config": {"name": "dropout", "trainable": True, "dtype": policy, "rate": 0.5,
                    "seed": None, "noise_shape": None},
         "name": "dropout",
         "inbound_nodes": [{"args": [tensor("batch_normalization", [None, 6, 6, 3])],
                            "kwargs": {"training": False}}]},
        {"module": "keras.layers", "class_name": "Concatenate", "registered_name": None,
         "config": {"name": "concatenate", "trainable": True, "dtype": policy, "axis": -1},
         "name": "concatenate",
         "inbound_nodes": [{"args": [[tensor("dropout", [None, 6, 6, 3]),
                                      tensor("input_layer", [None, 6, 6, 2])]],
                            "kwargs": {}}]},
    ]
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "config": {"name": "functional", "trainable": True, "layers": layers,
                       "input_layers": ["input_layer", 0, 0],
                       "output_layers": ["concatenate", 0, 0]},
            "registered_name": "Functional", "build_config": {"input_shape": None},
            "compile_config": {}}


def write_keras(path, config, groups):
    weights = io.BytesIO()
    write_h5(weights, groups)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", weights.getvalue())


def test_load_model_rebuilds_a_keras_functional_model(rng, tmp_path):
    kernel, bias = random(rng, 3, 3, 2, 3), random(rng, 3)
    bn = [random(rng, 3), random(rng, 3), random(rng, 3), np.abs(random(rng, 3)) + 0.5]
    write_keras(tmp_path / "m.keras", keras_config(rng),
                {"layers/conv2d": [kernel, bias], "layers/batch_normalization": bn})
    model = mc.models.load_model(tmp_path / "m.keras")
    assert [type(l).__name__ for l in model.layers] == [
        "Conv2D", "BatchNormalization", "Dropout", "Concatenate"]
    assert model.layers[0].activation == "relu" and model.layers[2].rate == 0.5
    x = rng.random((2, 6, 6, 2)).astype(np.float32)
    conv = mc.functions.conv2d(x, kernel, bias, padding="same").numpy()
    normalised = bn[0] * (np.maximum(conv, 0) - bn[2]) / np.sqrt(bn[3] + 1e-3) + bn[1]
    np.testing.assert_allclose(model.predict(x), np.concatenate([normalised, x], axis=-1),
                               rtol=1e-5, atol=1e-5)
    twin = mc.models.load_model(tmp_path / "m.keras")          # load_weights from a .keras too
    twin.set_weights([w * 0 for w in twin.get_weights()])
    twin.load_weights(tmp_path / "m.keras")
    np.testing.assert_array_equal(twin.predict(x), model.predict(x))


def test_an_unsupported_layer_is_named(rng, tmp_path):
    config = keras_config(rng)
    config["config"]["layers"][3].update({"class_name": "GaussianNoise",
                                          "config": {"name": "gaussian_noise", "stddev": 0.1}})
    write_keras(tmp_path / "noise.keras", config, {})
    with pytest.raises(ValueError, match=r"noise.keras: layer 'gaussian_noise' \(GaussianNoise\)"
                                         r" from module 'keras.layers' is not a layer minicnn has"):
        mc.models.load_model(tmp_path / "noise.keras")
    config = keras_config(rng)
    config["config"]["layers"][1]["config"]["kernel_regularizer"] = {"class_name": "L2"}
    write_keras(tmp_path / "l2.keras", config, {})
    with pytest.raises(ValueError, match=r"l2.keras: cannot rebuild.*kernel_regularizer"):
        mc.models.load_model(tmp_path / "l2.keras")
    config = keras_config(rng)
    config["config"]["layers"][2]["config"]["renorm"] = True
    write_keras(tmp_path / "renorm.keras", config, {})
    with pytest.raises(ValueError, match=r"'batch_normalization' \(BatchNormalization\) uses "
                                         r"renorm=True"):
        mc.models.load_model(tmp_path / "renorm.keras")


def test_save_keras_round_trips_functional_sequential_and_unet(rng, tmp_path):
    x = rng.random((2, 8, 8, 3)).astype(np.float32)
    seq = mc.Sequential([kl.Conv2D(2, 3), kl.BatchNormalization(), kl.Flatten(), kl.Dense(2)])
    seq.build((None, 8, 8, 3))
    unet = mc.models.UNet(2, base_filters=2, depth=1)
    unet.build((None, 8, 8, 3))
    for model in (functional(rng), seq, unet):
        randomize(model, rng)
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        with zipfile.ZipFile(path) as archive:
            assert sorted(archive.namelist()) == ["config.json", "metadata.json",
                                                  "model.weights.h5"]
            config = json.loads(archive.read("config.json"))
        loaded = mc.models.load_model(path)
        assert type(loaded) is type(model)
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert config["module"] == "minicnn.models.unet"            # Keras has no UNet class


def test_written_configs_use_keras_names(rng, tmp_path):
    model = functional(rng)
    model.save(tmp_path / "f.keras")
    with zipfile.ZipFile(tmp_path / "f.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert (config["module"], config["class_name"], config["registered_name"]) == (
        "keras.src.models.functional", "Functional", "Functional")
    first, conv = config["config"]["layers"][:2]
    assert (first["module"], first["class_name"]) == ("keras.layers", "InputLayer")
    assert first["config"]["batch_shape"] == [None, 8, 8, 3]
    assert (conv["module"], conv["class_name"]) == ("keras.layers", "Conv2D")
    assert conv["inbound_nodes"][0]["args"][0]["config"]["keras_history"] == [first["name"], 0, 0]
    seq = mc.Sequential([kl.Dense(2)])
    seq.build((None, 4))
    entry = K.to_keras(mc.layers.base.serialize(seq))
    assert entry["config"]["layers"][0]["class_name"] == "InputLayer"


@pytest.mark.parametrize("loader", ["load_model", "load_weights"])
def test_bad_keras_files_name_the_file_and_what_was_expected(rng, tmp_path, loader):
    good = tmp_path / "good.keras"
    functional(rng).save(good)
    payload = good.read_bytes()
    model = functional(rng)
    load = mc.models.load_model if loader == "load_model" else model.load_weights
    cases = {"empty.keras": b"", "half.keras": payload[:len(payload) // 2],
             "text.keras": b"not a zip at all", "h5.keras": b"\x89HDF\r\n\x1a\n" + bytes(40)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name) as info:
            load(tmp_path / name)
        assert "BadZipFile" not in type(info.value).__name__
        assert "Keras .keras file" in str(info.value)
    with zipfile.ZipFile(tmp_path / "noconfig.keras", "w") as archive:
        archive.writestr("model.weights.h5", b"")
    with pytest.raises(ValueError, match=r"noconfig.keras is not a Keras .keras file \(a zip "
                                         r"archive\) with config.json"):
        load(tmp_path / "noconfig.keras")


def test_bad_weights_files_name_the_file(rng, tmp_path):
    model = functional(rng)
    model.save_weights(tmp_path / "good.weights.h5")
    payload = (tmp_path / "good.weights.h5").read_bytes()
    cases = {"empty.weights.h5": (b"", "an empty file"),
             "half.weights.h5": (payload[:len(payload) // 3], "truncated or corrupt"),
             "zip.weights.h5": (b"PK\x03\x04" + bytes(30), "a zip archive")}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=expected) as info:
            model.load_weights(tmp_path / name)
        assert name in str(info.value) and "Keras .weights.h5" in str(info.value) or \
            "Keras weights file" in str(info.value)
    with pytest.raises(ValueError, match=r"Keras 3 weights end in \.weights\.h5"):
        model.load_weights(tmp_path / "model.h5")
    unbuilt = mc.Sequential([kl.Dense(2)])
    with pytest.raises(ValueError, match="build it first"):
        unbuilt.save_weights(tmp_path / "u.weights.h5")
