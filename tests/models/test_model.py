"""Model styles: functional, subclassed, Sequential; summary; weights order; devices."""
import numpy as np
import pytest

import minicnn as mc
from minicnn import layers as kl
from minicnn.models import Model, Sequential


def course_model():
    inputs = kl.Input((16, 16, 3))
    x = kl.Conv2D(4, (5, 5))(inputs)
    x = kl.BatchNormalization()(x)
    x = kl.Activation("relu")(x)
    x = kl.MaxPooling2D((2, 2))(x)
    outputs = kl.Conv2D(2, 1)(x)
    return Model(inputs, outputs)


class Subclassed(Model):
    def __init__(self):
        super().__init__()
        self.conv = kl.Conv2D(4, (5, 5))
        self.bn = kl.BatchNormalization()
        self.act = kl.Activation("relu")
        self.pool = kl.MaxPooling2D((2, 2))
        self.head = kl.Conv2D(2, 1)

    def call(self, x, training=False):
        return self.head(self.pool(self.act(self.bn(self.conv(x), training=training))))


def test_functional_and_subclassed_agree_with_same_weights(rng):
    x = rng.random((2, 16, 16, 3)).astype(np.float32)
    functional, subclassed = course_model(), Subclassed()
    subclassed(x)
    assert [w.shape for w in functional.weights] == [w.shape for w in subclassed.weights]
    subclassed.set_weights(functional.get_weights())
    for training in (False, True):
        np.testing.assert_array_equal(functional(x, training=training).numpy(),
                                      subclassed(x, training=training).numpy())


def test_functional_weight_order_and_counts():
    model = course_model()
    names = [w.name.rsplit("/", 1)[1] for w in model.weights]
    assert names == ["kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance",
                     "kernel", "bias"]
    assert model.count_params() == 4 * (5 * 5 * 3 + 1) + 4 * 4 + 2 * (4 + 1)
    assert len(model.trainable_weights) == 6


def test_summary_lists_layers_shapes_and_counts():
    lines = []
    course_model().summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "(None, 12, 12, 4)" in text and "(None, 6, 6, 2)" in text
    assert "304" in text
    assert "Total params: 330" in text


def test_layer_used_twice_shares_weights(rng):
    shared = kl.Conv2D(3, 3, padding="same")
    a, b = kl.Input((8, 8, 3)), kl.Input((8, 8, 3))
    model = Model([a, b], kl.Add()([shared(a), shared(b)]))
    assert len(model.weights) == 2
    x, y = rng.random((1, 8, 8, 3)), rng.random((1, 8, 8, 3))
    out = model([x, y]).numpy()
    np.testing.assert_allclose(out, shared(x).numpy() + shared(y).numpy(), rtol=1e-6)


def test_several_outputs_and_wrong_input_shape(rng):
    inputs = kl.Input((8, 8, 1))
    h = kl.Conv2D(2, 3, padding="same")(inputs)
    model = Model(inputs, [h, kl.MaxPooling2D()(h)])
    first, second = model(rng.random((2, 8, 8, 1)))
    assert first.shape == (2, 8, 8, 2) and second.shape == (2, 4, 4, 2)
    with pytest.raises(ValueError, match=r"expects shape \(None, 8, 8, 1\), got \(2, 9, 8, 1\)"):
        model(rng.random((2, 9, 8, 1)))


def test_sequential_builds_lazily_and_trains(rng):
    model = Sequential([kl.Conv2D(4, 3, padding="same", activation="relu"), kl.Conv2D(2, 1)])
    x = rng.random((4, 8, 8, 1)).astype(np.float32)
    y = (x[..., 0] > 0.5).astype(np.int64)
    model.compile(mc.optimizers.Adam(1e-2),
                  mc.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=2, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_explicit_loop_matches_readme(rng):
    model = course_model()
    opt = mc.optimizers.Adam(learning_rate=1e-3)
    loss_fn = mc.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = rng.random((2, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=(2, 6, 6))
    before = [w.copy() for w in model.get_weights()]
    loss = loss_fn(y, model(x, training=True))
    model.zero_grad()
    loss.backward()
    opt.step(model.trainable_weights)
    after = model.get_weights()
    assert all(w.grad is not None for w in model.trainable_weights)
    assert not np.array_equal(before[0], after[0])
    assert not np.array_equal(before[4], after[4])   # moving mean moved (training=True)
