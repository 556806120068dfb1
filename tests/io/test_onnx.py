"""ONNX export run by onnxruntime against minicnn's own outputs (float32, 1e-5 of the scale)."""
import numpy as np
import pytest

import minicnn as mc
from minicnn import layers as kl

onnx = pytest.importorskip("onnx", reason="ONNX export needs the optional onnx (test extra)")
ort = pytest.importorskip("onnxruntime", reason="running the file needs onnxruntime (test extra)")


def perturb(model, rng, scale=0.3):
    """Random weights (positive variances) so that every weight matters in the comparison."""
    model.set_weights([w + rng.standard_normal(w.shape).astype(w.dtype) * scale
                       for w in model.get_weights()])
    for w in model.weights:
        if w.name.endswith("moving_variance"):
            w.data[...] = np.abs(w.data) + 0.5


def run_onnx(model, x, path, **kwargs):
    model.export(path, format="onnx", **kwargs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def assert_close(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("padding, size", [("same", 32), ("valid", 44)])
def test_unet_runs_in_onnxruntime_with_minicnn_outputs(rng, tmp_path, padding, size):
    model = mc.models.UNet(3, base_filters=4, depth=2, padding=padding)
    model.build((None, size, size, 2))
    perturb(model, rng, 0.1)
    x = rng.random((2, size, size, 2)).astype(np.float32)
    assert_close(run_onnx(model, x, tmp_path / "unet.onnx"), model.predict(x))
    proto = onnx.load(tmp_path / "unet.onnx")
    assert proto.opset_import[0].version >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", size, size, 2]                            # NHWC, as the model takes it


def test_open_sizes_stay_dynamic(rng, tmp_path):
    model = mc.models.UNet(2, base_filters=2, depth=2)
    model.build((None, 16, 16, 1))
    perturb(model, rng, 0.1)
    model.export(tmp_path / "dyn.onnx", input_signature=(None, None, None, 1))
    session = ort.InferenceSession(str(tmp_path / "dyn.onnx"), providers=["CPUExecutionProvider"])
    for size in (16, 24):
        x = rng.random((1, size, size + 8, 1)).astype(np.float32)
        assert_close(session.run(None, {"input": x})[0], model.predict(x))


def every_layer_model():
    inputs = kl.Input((15, 17, 3))
    a = kl.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    b = kl.BatchNormalization()(a)
    c = kl.DepthwiseConv2D(3, padding="same", depth_multiplier=2, dilation_rate=2)(b)
    d = kl.SeparableConv2D(4, 3, padding="same", strides=2, activation="sigmoid")(c)
    ups = [kl.Conv2DTranspose(4, 3, strides=2, padding="same")(d),
           kl.Conv2DTranspose(4, 3, strides=2, padding="same", output_padding=1)(d),
           kl.Conv2DTranspose(2, 3, strides=2, output_padding=1)(d)]
    s = kl.SpatialSeparableConv2D(4, 3, padding="same")(a)
    e = kl.Add()([a, s, b])
    p = kl.MaxPooling2D(2, padding="same")(e)
    q = kl.AveragePooling2D(3, strides=2, padding="same")(e)
    cr = kl.Cropping2D(((1, 2), (0, 1)))(kl.ZeroPadding2D(((1, 2), (0, 1)))(p))
    cat = kl.Concatenate()([cr, q])
    up = kl.UpSampling2D(2, interpolation="bilinear")(cat)
    r = kl.ReLU(max_value=0.8, negative_slope=0.1, threshold=0.2)(up)
    sm = kl.Softmax()(kl.LeakyReLU(0.2)(kl.Activation("tanh")(r)))
    g = kl.GlobalAveragePooling2D()(kl.Dropout(0.5)(sm))
    f = kl.Flatten()(kl.UpSampling2D((2, 3))(cat))
    extra = [kl.GlobalAveragePooling2D()(u) for u in ups]
    h = kl.Concatenate()([g, kl.Dense(5, activation="tanh")(f), *extra])
    out = kl.Dense(3, activation="softmax")(kl.BatchNormalization()(h))
    return mc.Model(inputs, out)


def test_every_layer_converts(rng, tmp_path):
    model = every_layer_model()
    perturb(model, rng)
    x = rng.random((3, 15, 17, 3)).astype(np.float32)
    assert_close(run_onnx(model, x, tmp_path / "all.onnx"), model.predict(x))


def test_image_outputs_dense_on_images_and_sequential(rng, tmp_path):
    inputs = kl.Input((6, 6, 2))
    h = kl.Dense(3, activation="relu")(kl.Conv2D(4, 3, padding="same")(inputs))   # per pixel
    model = mc.Model(inputs, kl.Activation("softmax")(h))
    perturb(model, rng)
    x = rng.random((2, 6, 6, 2)).astype(np.float32)
    assert_close(run_onnx(model, x, tmp_path / "pixel.onnx"), model.predict(x))
    seq = mc.Sequential([kl.Dense(4, activation="relu"), kl.BatchNormalization(), kl.Dense(2)])
    seq.build((None, 5))
    perturb(seq, rng)
    x = rng.random((3, 5)).astype(np.float32)
    assert_close(run_onnx(seq, x, tmp_path / "seq.onnx"), seq.predict(x))
    cnn = mc.models.SmallCNN(3, filters=2, blocks=2)                 # residual blocks inside
    cnn.build((None, 8, 8, 1))
    perturb(cnn, rng, 0.1)
    x = rng.random((2, 8, 8, 1)).astype(np.float32)
    assert_close(run_onnx(cnn, x, tmp_path / "cnn.onnx"), cnn.predict(x))


def test_export_refuses_what_it_cannot_write(rng, tmp_path):
    class Double(kl.Layer):
        def call(self, x, training=False):
            return x * 2
    inputs = kl.Input((4, 4, 1))
    model = mc.Model(inputs, Double(name="double")(inputs))
    with pytest.raises(ValueError, match=r"export: Double 'double' has no ONNX conversion"):
        model.export(tmp_path / "d.onnx")
    with pytest.raises(ValueError, match="format must be 'onnx'"):
        model.export(tmp_path / "d", format="tf_saved_model")
    with pytest.raises(ValueError, match="opset must be >= 17"):
        model.export(tmp_path / "d.onnx", opset=13)
    with pytest.raises(ValueError, match="no input shape yet"):
        mc.models.UNet(2, depth=1).export(tmp_path / "u.onnx")
    assert not list(tmp_path.iterdir())                               # nothing half-written
