"""minicnn.losses: Keras 3's documented and tested values, float64 gradient checks of every loss
and option, Keras' reduction / mask / sample_weight rules, extreme inputs and bad inputs."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minicnn as mc
from minicnn import losses as L
from kernels.backend import to_device, to_numpy

# ============================================================================== Keras ground truth
# Values from Keras 3's docstrings (keras/src/losses/losses.py) and its tests
# (keras/src/losses/losses_test.py), and tf.keras 2's docstrings where noted: independent of us.
P3 = np.array([[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]], np.float32)  # rows != 1
LOGITS3 = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
EYE3 = np.eye(3)
LABELS3 = np.array([[0], [1], [2]])
SW3 = np.array([[1.2], [3.4], [5.6]])
BCE_T = np.array([[0, 1], [0, 0]])
BCE_LOGITS = np.array([[-18.6, 0.51], [2.94, -12.8]], np.float32)
DOC_T = np.array([[0, 1, 0], [0, 0, 1]])
DOC_P = np.array([[0.05, 0.95, 0], [0.1, 0.8, 0.1]], np.float32)
MSE_T = np.array([[1, 9, 2], [-5, -2, 6]])
MSE_P = np.array([[4, 8, 12], [8, 1, 3]], np.float32)
DICE_T = np.array([[[[1.0], [1.0]], [[0.0], [0.0]]], [[[1.0], [1.0]], [[0.0], [0.0]]]], np.float32)
DICE_P = np.array([[[[0.0], [1.0]], [[0.0], [1.0]]], [[[0.4], [0.0]], [[0.0], [0.9]]]], np.float32)
COURSE_T = np.array([[1, 2], [0, 2]])
COURSE_P = np.array([[0.05, 0.95, 0], [0.1, .01, 0.8], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]],
                    np.float32).reshape(2, 2, 3)

KERAS_VALUES = [
    # id, loss, y_true, y_pred, sample_weight, expected, absolute tolerance
    ("course_scce", L.SparseCategoricalCrossentropy(), COURSE_T, COURSE_P, None, 0.26191, 1e-5),
    ("scce_doc", L.SparseCategoricalCrossentropy(), [1, 2], DOC_P, None, 1.17694, 1e-5),
    ("scce_doc_sw", L.SparseCategoricalCrossentropy(), [1, 2], DOC_P, [0.3, 0.7], 0.814, 1e-3),
    ("scce_doc_sum", L.SparseCategoricalCrossentropy(reduction="sum"), [1, 2], DOC_P, None, 2.354, 1e-3),
    ("scce_doc_none", L.SparseCategoricalCrossentropy(reduction=None), [1, 2], DOC_P, None,
     [0.0513, 2.303], 1e-3),
    ("scce_renormalised", L.SparseCategoricalCrossentropy(), [0, 1, 2], P3, None, 0.3239, 1e-3),
    ("scce_logits", L.SparseCategoricalCrossentropy(from_logits=True), [0, 1, 2], LOGITS3, None,
     0.0573, 1e-3),
    ("scce_scalar_w", L.SparseCategoricalCrossentropy(), LABELS3, P3, 2.3, 0.7449, 1e-3),
    ("scce_logits_scalar_w", L.SparseCategoricalCrossentropy(from_logits=True), LABELS3, LOGITS3,
     2.3, 0.1317, 1e-3),
    ("scce_sample_w", L.SparseCategoricalCrossentropy(), LABELS3, P3, SW3, 1.0696, 1e-3),
    ("scce_logits_sample_w", L.SparseCategoricalCrossentropy(from_logits=True), LABELS3, LOGITS3,
     SW3, 0.31829, 1e-4),
    ("scce_none", L.SparseCategoricalCrossentropy(from_logits=True, reduction=None), LABELS3,
     LOGITS3, None, [0.001822, 0.000459, 0.169846], 1e-6),
    ("scce_ignore", L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1,
                                                    reduction=None),
     [[-1, 2]], [[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018]]], None, [[0.0, 1.480129]], 1e-6),
    ("scce_ignore_channel", L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1,
                                                            reduction=None),
     [[[-1], [2]]], [[[0.854, 0.698, 0.598], [0.088, 0.86, 0.018]]], None, [[0.0, 1.480129]], 1e-6),
    ("cce_doc", L.CategoricalCrossentropy(), DOC_T, DOC_P, None, 1.177, 1e-3),
    ("cce_doc_sw", L.CategoricalCrossentropy(), DOC_T, DOC_P, [0.3, 0.7], 0.814, 1e-3),
    ("cce_doc_sum", L.CategoricalCrossentropy(reduction="sum"), DOC_T, DOC_P, None, 2.354, 1e-3),
    ("cce_doc_none", L.CategoricalCrossentropy(reduction=None), DOC_T, DOC_P, None,
     [0.0513, 2.303], 1e-3),
    ("cce_renormalised", L.CategoricalCrossentropy(), EYE3, P3, None, 0.3239, 1e-3),
    ("cce_logits", L.CategoricalCrossentropy(from_logits=True), EYE3, LOGITS3, None, 0.0573, 1e-3),
    ("cce_sample_w", L.CategoricalCrossentropy(), EYE3, P3, SW3, 1.0696, 1e-3),
    ("cce_logits_sample_w", L.CategoricalCrossentropy(from_logits=True), EYE3, LOGITS3, SW3,
     0.31829, 1e-4),
    ("cce_smoothing", L.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
     [[1, 0, 0]], [[100.0, -100.0, -100.0]], None, 400.0 * 0.1 / 3.0, 1e-4),
    ("bce_doc_1", L.BinaryCrossentropy(from_logits=True), [0, 1, 0, 0],
     [-18.6, 0.51, 2.94, -12.8], None, 0.8654, 1e-4),
    ("bce_doc_2", L.BinaryCrossentropy(from_logits=True), BCE_T, BCE_LOGITS, None, 0.8654, 1e-4),
    ("bce_doc_sw", L.BinaryCrossentropy(from_logits=True), BCE_T, BCE_LOGITS, [0.8, 0.2], 0.243, 1e-3),
    ("bce_doc_sum", L.BinaryCrossentropy(from_logits=True, reduction="sum"), BCE_T, BCE_LOGITS,
     None, 1.730, 1e-3),
    ("bce_doc_none", L.BinaryCrossentropy(from_logits=True, reduction=None), BCE_T, BCE_LOGITS,
     None, [0.235, 1.496], 1e-3),
    ("bce_fn_doc", L.BinaryCrossentropy(reduction=None), BCE_T, [[0.6, 0.4], [0.4, 0.6]], None,
     [0.916, 0.714], 1e-3),
    ("bce_tf2_doc", L.BinaryCrossentropy(), BCE_T, [[0.6, 0.4], [0.4, 0.6]], None, 0.815, 1e-3),
    ("bce_tf2_doc_sw", L.BinaryCrossentropy(), BCE_T, [[0.6, 0.4], [0.4, 0.6]], [1, 0], 0.458, 1e-3),
    ("bce_clip_at_1", L.BinaryCrossentropy(), [[1, 0], [1, 0]], np.array([[1, 1], [1, 0]], np.float32),
     None, 3.98559, 1e-5),
    ("bce_logits_softplus", L.BinaryCrossentropy(from_logits=True), [[1, 0, 1], [0, 1, 1]],
     [[10.0, -10.0, 10.0], [10.0, 10.0, -10.0]], None, 3.3333, 1e-4),
    ("bce_logits_sample_w", L.BinaryCrossentropy(from_logits=True), [[1, 0, 1], [0, 1, 1]],
     [[10.0, -10.0, 10.0], [10.0, 10.0, -10.0]], [4, 3], 10.0, 1e-3),
    ("bce_smoothing", L.BinaryCrossentropy(from_logits=True, label_smoothing=0.1), [[1, 0, 1]],
     [[10.0, -10.0, -10.0]], None, (10.0 + 5.0 * 0.1) / 3.0, 1e-4),
    ("bce_scalar_w", L.BinaryCrossentropy(), [[1, 0], [1, 0]], np.array([[1, 1], [1, 0]], np.float32),
     2.3, 9.1668, 1e-3),
    ("bce_sample_w", L.BinaryCrossentropy(), [[1, 0], [1, 0]], np.array([[1, 1], [1, 0]], np.float32),
     [[1.2], [3.4]], 4.7827, 1e-3),
    ("bfce_doc_1", L.BinaryFocalCrossentropy(gamma=2, from_logits=True), [0, 1, 0, 0],
     [-18.6, 0.51, 2.94, -12.8], None, 0.691, 1e-3),
    ("bfce_doc_1_bal", L.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=2,
                                                 from_logits=True),
     [0, 1, 0, 0], [-18.6, 0.51, 2.94, -12.8], None, 0.51, 1e-2),
    ("bfce_doc_g3", L.BinaryFocalCrossentropy(gamma=3, from_logits=True), BCE_T, BCE_LOGITS, None,
     0.647, 1e-3),
    ("bfce_doc_g3_bal", L.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=3,
                                                  from_logits=True),
     BCE_T, BCE_LOGITS, None, 0.482, 1e-3),
    ("bfce_doc_sw", L.BinaryFocalCrossentropy(gamma=3, from_logits=True), BCE_T, BCE_LOGITS,
     [0.8, 0.2], 0.133, 1e-3),
    ("bfce_doc_sw_bal", L.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=3,
                                                  from_logits=True),
     BCE_T, BCE_LOGITS, [0.8, 0.2], 0.097, 1e-3),
    ("bfce_doc_sum", L.BinaryFocalCrossentropy(gamma=4, from_logits=True, reduction="sum"),
     BCE_T, BCE_LOGITS, None, 1.222, 1e-3),
    ("bfce_doc_sum_bal", L.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=4,
                                                   from_logits=True, reduction="sum"),
     BCE_T, BCE_LOGITS, None, 0.914, 1e-3),
    ("bfce_doc_none", L.BinaryFocalCrossentropy(gamma=5, from_logits=True, reduction=None),
     BCE_T, BCE_LOGITS, None, [0.0017, 1.1561], 1e-4),
    ("bfce_doc_none_bal", L.BinaryFocalCrossentropy(apply_class_balancing=True, gamma=5,
                                                    from_logits=True, reduction=None),
     BCE_T, BCE_LOGITS, None, [0.0004, 0.8670], 1e-4),
    ("bfce_fn_doc", L.BinaryFocalCrossentropy(gamma=2, reduction=None), BCE_T,
     [[0.6, 0.4], [0.4, 0.6]], None, [0.330, 0.206], 1e-3),
    ("bfce_test_probs", L.BinaryFocalCrossentropy(gamma=2.0), [[1, 0], [1, 0]],
     np.array([[0.9, 0.8], [0.7, 0.2]], np.float32), None, 0.268, 1e-3),
    ("bfce_test_logits", L.BinaryFocalCrossentropy(gamma=3.0, from_logits=True),
     [[1, 1, 0], [0, 1, 0]], [[1.5, -2.7, 2.9], [-3.8, 1.2, -4.5]], None, 0.799, 1e-3),
    ("bfce_test_sample_w", L.BinaryFocalCrossentropy(gamma=2.0), [[1, 0], [1, 0]],
     np.array([[0.9, 0.8], [0.7, 0.2]], np.float32), [[1.2], [3.4]], 0.34415, 1e-4),
    ("bfce_test_none", L.BinaryFocalCrossentropy(gamma=2.0, reduction=None), [[1, 0], [1, 0]],
     np.array([[0.9, 0.8], [0.7, 0.2]], np.float32), None, [0.515547, 0.020513], 1e-5),
    ("cfce_doc", L.CategoricalFocalCrossentropy(), DOC_T, DOC_P, None, 0.23315276, 1e-6),
    ("cfce_doc_sw", L.CategoricalFocalCrossentropy(), DOC_T, DOC_P, [0.3, 0.7], 0.1632, 1e-4),
    ("cfce_doc_sum", L.CategoricalFocalCrossentropy(reduction="sum"), DOC_T, DOC_P, None,
     0.46631, 1e-5),
    ("cfce_doc_none", L.CategoricalFocalCrossentropy(reduction=None), DOC_T, DOC_P, None,
     [3.2058331e-05, 4.6627346e-01], 1e-6),
    ("cfce_fn_doc", L.CategoricalFocalCrossentropy(reduction=None), DOC_T,
     [[0.05, 0.9, 0.05], [0.1, 0.85, 0.05]], None, [2.63401289e-04, 6.75912094e-01], 1e-6),
    ("cfce_renormalised", L.CategoricalFocalCrossentropy(), EYE3, P3, None, 0.02059, 1e-4),
    ("cfce_logits_none", L.CategoricalFocalCrossentropy(from_logits=True, reduction=None), EYE3,
     LOGITS3, None, [1.5096224e-09, 2.4136547e-11, 1.0360638e-03], 1e-8),
    ("cfce_smoothing", L.CategoricalFocalCrossentropy(from_logits=True, label_smoothing=0.1),
     [[1, 0, 0]], [[4.9, -0.5, 2.05]], None, 0.06685, 1e-4),
    ("dice_doc_axis", L.Dice(axis=(1, 2, 3), reduction=None), DICE_T, DICE_P, None,
     [0.5, 0.75757575], 1e-6),
    ("dice_doc", L.Dice(), DICE_T, DICE_P, None, 0.6164384, 1e-6),
    ("dice_test", L.Dice(), [[1, 2], [1, 2]], [[4, 1], [6, 1]], None, -0.55555546, 1e-6),
    ("dice_test_binary", L.Dice(), [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]],
     [[0, 1, 0, 1], [1, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1]], None, 0.77777773, 1e-6),
    ("mse_test", L.MeanSquaredError(), MSE_T, MSE_P, None, 49.5, 1e-4),
    ("mse_scalar_w", L.MeanSquaredError(), MSE_T, MSE_P, 2.3, 113.85, 1e-3),
    ("mse_sample_w", L.MeanSquaredError(), MSE_T, MSE_P, [[1.2], [3.4]], 767.8 / 6, 1e-3),
    ("mse_timestep_w", L.MeanSquaredError(), MSE_T.reshape(2, 3, 1), MSE_P.reshape(2, 3, 1),
     np.array([3, 6, 5, 0, 4, 2]).reshape(2, 3), 97.833336, 1e-4),
    ("mse_zero_w", L.MeanSquaredError(), MSE_T, MSE_P, 0, 0.0, 1e-7),
    ("mse_none", L.MeanSquaredError(reduction=None), MSE_T, MSE_P, 2.3, [84.3333, 143.3666], 1e-3),
    ("mse_sum", L.MeanSquaredError(reduction="sum"), MSE_T, MSE_P, 2.3, 227.69998, 1e-3),
    ("mse_mean_with_sw", L.MeanSquaredError(reduction="mean_with_sample_weight"), MSE_T, MSE_P,
     [[1.2], [3.4]], (110 / 3 * 1.2 + 187 / 3 * 3.4) / (1.2 + 3.4), 1e-3),
    ("mse_tf2_doc", L.MeanSquaredError(), [[0.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]],
     None, 0.5, 1e-7),
    ("mse_tf2_doc_sw", L.MeanSquaredError(), [[0.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]],
     [0.7, 0.3], 0.25, 1e-7),
]


@pytest.mark.parametrize("case", KERAS_VALUES, ids=[c[0] for c in KERAS_VALUES])
def test_keras_documented_values(case):
    _, loss, y_true, y_pred, sample_weight, expected, tol = case
    y_pred = np.asarray(y_pred)
    y_pred = y_pred.astype(np.float32) if y_pred.dtype.kind != "f" else y_pred
    result = loss(np.asarray(y_true),
                  mc.Tensor(y_pred),
                  sample_weight=None if sample_weight is None else np.asarray(sample_weight))
    got = result.numpy()
    assert got.shape == np.shape(expected) or got.size == np.size(expected)
    np.testing.assert_allclose(got.reshape(np.shape(expected)), expected, atol=tol, rtol=0)


def test_keras_segmentation_cases():
    """Keras' test_multi_class_segmentation: 16 pixels, three wrong-ish ones, the rest exact."""
    y_true = np.array([[0, 1, 2, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
    y_pred = np.zeros((4, 4, 3))
    y_pred[np.arange(4)[:, None], np.arange(4)[None, :], y_true] = 1.0
    y_pred[0, 3] = [0.2, 0.0, 0.8]
    y_pred[1, 0] = [0.7, 0.3, 0.0]
    y_pred[3, 2] = [0.5, 0.5, 0.0]
    got = L.SparseCategoricalCrossentropy()(y_true, y_pred).item()
    assert got == pytest.approx(-(np.log(0.2) + np.log(0.3) + np.log(0.5)) / 16, abs=1e-6)
    # the same with the classes first (axis=0), as Keras' torch backend allows
    got0 = L.SparseCategoricalCrossentropy(axis=0)(y_true, np.moveaxis(y_pred, 2, 0)).item()
    assert got0 == pytest.approx(got, rel=1e-12)


def test_binary_crossentropy_squeezes_a_trailing_channel_like_keras():
    """y_true (N, H, W) with y_pred (N, H, W, 1): Keras squeezes y_pred, then means over W."""
    rng = np.random.default_rng(0)
    t = (rng.uniform(size=(2, 3, 4)) > 0.5).astype(float)
    p = rng.uniform(0.1, 0.9, (2, 3, 4, 1))
    per_row = L.BinaryCrossentropy(reduction=None)(t, p).numpy()
    assert per_row.shape == (2, 3)
    per_pixel = L.BinaryCrossentropy(reduction=None)(t[..., None], p).numpy()
    assert per_pixel.shape == (2, 3, 4)
    np.testing.assert_allclose(per_row, per_pixel.mean(axis=-1), rtol=1e-12)


# ============================================================================== gradients (float64)
SHAPES = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
REDUCTIONS = st.sampled_from(["sum_over_batch_size", "sum", None, "mean_with_sample_weight"])


def draw_weight(rng, kind, shape):
    if kind == "none":
        return None
    if kind == "scalar":
        return np.float64(rng.uniform(0.5, 2))
    if kind == "per_sample":
        return rng.uniform(0.5, 2, shape[:1])
    return rng.uniform(0, 2, shape)                       # a weight map of the losses' shape


def draw_predictions(rng, shape, classes, from_logits, scale=1.0):
    """Class scores of shape ``shape + (classes,)``: logits, or probabilities in [0.05, 1)."""
    if from_logits:
        return rng.standard_normal(shape + (classes,)) * scale
    return rng.uniform(0.05, 1, shape + (classes,))


WEIGHTS = st.sampled_from(["none", "scalar", "per_sample", "map"])


def check(loss, y_true, y_pred, sample_weight=None):
    assert mc.gradcheck(lambda p: loss(y_true, p, sample_weight=sample_weight), y_pred)


@given(shape=SHAPES, classes=st.integers(2, 4), from_logits=st.booleans(), weights=WEIGHTS,
       reduction=REDUCTIONS, ignore=st.booleans(), class_weight=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gradcheck_sparse_categorical(shape, classes, from_logits, weights, reduction, ignore,
                                      class_weight, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, classes, shape)
    if ignore:
        y_true[rng.uniform(size=shape) < 0.3] = 255
    y_pred = draw_predictions(rng, shape, classes, from_logits)
    loss = L.SparseCategoricalCrossentropy(
        from_logits=from_logits, ignore_class=255 if ignore else None, reduction=reduction,
        class_weight=rng.uniform(0.5, 2, classes) if class_weight else None)
    check(loss, y_true, y_pred, draw_weight(rng, weights, shape))


@given(shape=SHAPES, classes=st.integers(2, 4), from_logits=st.booleans(), weights=WEIGHTS,
       reduction=REDUCTIONS, smoothing=st.sampled_from([0.0, 0.2]), class_weight=st.booleans(),
       axis=st.sampled_from([-1, 0]), seed=st.integers(0, 2**16))
def test_gradcheck_categorical(shape, classes, from_logits, weights, reduction, smoothing,
                               class_weight, axis, seed):
    rng = np.random.default_rng(seed)
    y_true = np.eye(classes)[rng.integers(0, classes, shape)]
    y_pred = draw_predictions(rng, shape, classes, from_logits, scale=2.0)
    if axis == 0:                                         # classes first
        y_true = np.moveaxis(y_true, -1, 0)
        y_pred = np.ascontiguousarray(np.moveaxis(y_pred, -1, 0))
    loss = L.CategoricalCrossentropy(
        from_logits=from_logits, label_smoothing=smoothing, axis=axis, reduction=reduction,
        class_weight=rng.uniform(0.5, 2, classes) if class_weight else None)
    check(loss, y_true, y_pred, draw_weight(rng, weights, shape))


@given(shape=SHAPES, from_logits=st.booleans(), weights=WEIGHTS, reduction=REDUCTIONS,
       smoothing=st.sampled_from([0.0, 0.3]), class_weight=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gradcheck_binary(shape, from_logits, weights, reduction, smoothing, class_weight, seed):
    rng = np.random.default_rng(seed)
    y_true = (rng.uniform(size=shape + (2,)) > 0.5).astype(float)
    y_pred = rng.standard_normal(shape + (2,)) * 3 if from_logits else \
        rng.uniform(0.05, 0.95, shape + (2,))
    loss = L.BinaryCrossentropy(from_logits=from_logits, label_smoothing=smoothing,
                                reduction=reduction, class_weight=[0.4, 1.7] if class_weight else None)
    check(loss, y_true, y_pred, draw_weight(rng, weights, shape))


@given(shape=SHAPES, from_logits=st.booleans(), balanced=st.booleans(),
       gamma=st.sampled_from([0.0, 1.0, 2.0, 2.5]), alpha=st.floats(0.1, 0.9), weights=WEIGHTS,
       reduction=REDUCTIONS, smoothing=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_gradcheck_binary_focal(shape, from_logits, balanced, gamma, alpha, weights, reduction,
                                smoothing, seed):
    rng = np.random.default_rng(seed)
    y_true = (rng.uniform(size=shape + (3,)) > 0.5).astype(float)
    y_pred = rng.standard_normal(shape + (3,)) * 3 if from_logits else \
        rng.uniform(0.05, 0.95, shape + (3,))
    loss = L.BinaryFocalCrossentropy(apply_class_balancing=balanced, alpha=alpha, gamma=gamma,
                                     from_logits=from_logits, label_smoothing=smoothing,
                                     reduction=reduction)
    check(loss, y_true, y_pred, draw_weight(rng, weights, shape))


@given(shape=SHAPES, classes=st.integers(2, 4), from_logits=st.booleans(),
       gamma=st.sampled_from([0.0, 2.0, 3.0]), vector_alpha=st.booleans(), weights=WEIGHTS,
       reduction=REDUCTIONS, smoothing=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_gradcheck_categorical_focal(shape, classes, from_logits, gamma, vector_alpha, weights,
                                     reduction, smoothing, seed):
    rng = np.random.default_rng(seed)
    y_true = np.eye(classes)[rng.integers(0, classes, shape)]
    y_pred = draw_predictions(rng, shape, classes, from_logits, scale=2.0)
    alpha = list(rng.uniform(0.1, 1, classes)) if vector_alpha else 0.25
    loss = L.CategoricalFocalCrossentropy(alpha=alpha, gamma=gamma, from_logits=from_logits,
                                          label_smoothing=smoothing, reduction=reduction)
    check(loss, y_true, y_pred, draw_weight(rng, weights, shape))


@given(shape=SHAPES, weights=st.sampled_from(["none", "scalar", "map"]), reduction=REDUCTIONS,
       seed=st.integers(0, 2**16))
def test_gradcheck_mean_squared_error(shape, weights, reduction, seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.standard_normal(shape + (3,)), rng.standard_normal(shape + (3,))
    check(L.MeanSquaredError(reduction=reduction), y_true, y_pred, draw_weight(rng, weights, shape))


@given(shape=st.lists(st.integers(1, 3), min_size=2, max_size=4).map(tuple), data=st.data(),
       reduction=REDUCTIONS, seed=st.integers(0, 2**16))
def test_gradcheck_dice(shape, data, reduction, seed):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.sampled_from([None, tuple(range(1, len(shape))), -1]))
    y_true = (rng.uniform(size=shape) > 0.5).astype(float)
    check(L.Dice(axis=axis, reduction=reduction), y_true, rng.uniform(0, 1, shape))


@given(shape=SHAPES, classes=st.integers(2, 4), from_logits=st.booleans(), ignore=st.booleans(),
       weights=WEIGHTS, reduction=REDUCTIONS, smooth=st.sampled_from([1e-3, 1.0]),
       seed=st.integers(0, 2**16))
def test_gradcheck_ce_dice(shape, classes, from_logits, ignore, weights, reduction, smooth, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, classes, shape)
    if ignore:
        y_true[rng.uniform(size=shape) < 0.3] = -1
    y_pred = draw_predictions(rng, shape, classes, from_logits)
    loss = L.CEDice(from_logits=from_logits, ignore_class=-1 if ignore else None,
                    dice_weight=0.7, smooth=smooth, reduction=reduction)
    check(loss, y_true, y_pred, draw_weight(rng, weights, shape))


# ============================================================================== Keras' reduction rules
def test_ignore_class_leaves_the_mean_and_the_gradient():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, (2, 4, 4))
    y_true[0, :2] = 255
    logits = rng.standard_normal((2, 4, 4, 3))
    x = mc.Tensor(logits, requires_grad=True)
    loss = L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)(y_true, x)
    loss.backward()
    valid = y_true != 255
    kept = L.SparseCategoricalCrossentropy(from_logits=True)(y_true[valid], logits[valid])
    assert loss.item() == pytest.approx(kept.item(), rel=1e-12)     # mean over valid pixels
    assert np.all(x.grad[~valid] == 0)
    everything_ignored = L.SparseCategoricalCrossentropy(ignore_class=255)(
        np.full((1, 2, 2), 255), np.full((1, 2, 2, 3), 1 / 3))
    assert everything_ignored.item() == 0.0                        # 0, not NaN
    summed = L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255, reduction="sum")
    assert summed(y_true, logits).item() == pytest.approx(kept.item() * valid.sum(), rel=1e-12)


def test_unet_weight_map_and_per_sample_weights():
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 3, (2, 3, 4))
    logits = rng.standard_normal((2, 3, 4, 3))
    per_pixel = L.sparse_categorical_crossentropy(y_true, logits, from_logits=True).numpy()
    weight_map = rng.uniform(0, 5, (2, 3, 4))
    scce = L.SparseCategoricalCrossentropy(from_logits=True)
    # Keras: sum(w * loss) / number of pixels, not / sum(w)
    assert scce(y_true, logits, sample_weight=weight_map).item() == pytest.approx(
        (weight_map * per_pixel).sum() / per_pixel.size, rel=1e-12)
    assert scce(y_true, logits, sample_weight=weight_map[..., None]).item() == pytest.approx(
        (weight_map * per_pixel).sum() / per_pixel.size, rel=1e-12)
    per_image = np.array([0.25, 2.0])
    assert scce(y_true, logits, sample_weight=per_image).item() == pytest.approx(
        (per_image[:, None, None] * per_pixel).mean(), rel=1e-12)
    weighted_mean = L.SparseCategoricalCrossentropy(from_logits=True,
                                                    reduction="mean_with_sample_weight")
    assert weighted_mean(y_true, logits, sample_weight=weight_map).item() == pytest.approx(
        (weight_map * per_pixel).sum() / weight_map.sum(), rel=1e-12)


def test_class_weight_multiplies_each_pixel_by_its_class_weight():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, (2, 5))
    logits = rng.standard_normal((2, 5, 3))
    cw = np.array([0.2, 1.0, 3.0])
    as_sample_weight = L.SparseCategoricalCrossentropy(from_logits=True)(
        y_true, logits, sample_weight=cw[y_true]).item()
    sparse = L.SparseCategoricalCrossentropy(from_logits=True, class_weight=cw)(y_true, logits)
    dense = L.CategoricalCrossentropy(from_logits=True, class_weight=cw)(np.eye(3)[y_true], logits)
    assert sparse.item() == pytest.approx(as_sample_weight, rel=1e-12)
    assert dense.item() == pytest.approx(as_sample_weight, rel=1e-12)
    t = (rng.uniform(size=(4, 1)) > 0.5).astype(float)
    p = rng.uniform(0.1, 0.9, (4, 1))
    plain = L.BinaryCrossentropy(reduction=None)(t, p).numpy()
    weighted = L.BinaryCrossentropy(class_weight=[0.5, 4.0], reduction=None)(t, p).numpy()
    np.testing.assert_allclose(weighted, plain * np.where(t[:, 0] == 1, 4.0, 0.5), rtol=1e-12)


def test_ce_dice_is_cross_entropy_plus_batch_soft_dice():
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 3, (2, 3, 3))
    logits = rng.standard_normal((2, 3, 3, 3))
    ce = L.SparseCategoricalCrossentropy(from_logits=True)(y_true, logits).item()
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    g = np.eye(3)[y_true]
    inter = (p * g).sum(axis=(0, 1, 2))
    dice = (2 * inter + 1.0) / (p.sum(axis=(0, 1, 2)) + g.sum(axis=(0, 1, 2)) + 1.0)
    expected = ce + 0.5 * (1 - dice.mean())
    got = L.CEDice(from_logits=True, dice_weight=0.5)(y_true, logits).item()
    assert got == pytest.approx(expected, rel=1e-12)
    none = L.CEDice(from_logits=True, dice_weight=0.5, reduction=None)(y_true, logits).numpy()
    assert none.shape == (2, 3, 3) and none.mean() == pytest.approx(expected, rel=1e-12)


def test_loss_is_one_function_with_a_closed_form_backward():
    x = mc.Tensor(np.random.default_rng(5).standard_normal((2, 3, 3, 4)), requires_grad=True)
    out = L.SparseCategoricalCrossentropy(from_logits=True)(np.zeros((2, 3, 3), int), x)
    assert isinstance(out.creator, L.LossOp)
    assert out.creator.inputs == (x.node,)
    out.backward()
    p = np.exp(x.data) / np.exp(x.data).sum(-1, keepdims=True)
    np.testing.assert_allclose(x.grad, (p - np.eye(4)[0]) / 18, rtol=1e-12)   # softmax - one_hot


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_kept(dtype):
    x = mc.Tensor(np.random.default_rng(6).standard_normal((2, 4, 3)).astype(dtype),
                  requires_grad=True)
    out = L.SparseCategoricalCrossentropy(from_logits=True)(np.zeros((2, 4), int), x)
    out.backward()
    assert out.dtype == dtype and x.grad.dtype == dtype
    out64 = L.CategoricalCrossentropy(from_logits=True, dtype="float64")(np.eye(3)[[0, 1]], x[0, :2])
    assert out64.dtype == np.float64


# ============================================================================== extremes
EXTREME_LOSSES = [
    ("bce", lambda fl: L.BinaryCrossentropy(from_logits=fl), "dense"),
    ("cce", lambda fl: L.CategoricalCrossentropy(from_logits=fl), "dense"),
    ("scce", lambda fl: L.SparseCategoricalCrossentropy(from_logits=fl), "sparse"),
    ("bfocal", lambda fl: L.BinaryFocalCrossentropy(from_logits=fl, apply_class_balancing=True),
     "dense"),
    ("cfocal", lambda fl: L.CategoricalFocalCrossentropy(from_logits=fl, alpha=[0.2, 0.3, 0.5]),
     "dense"),
    ("cedice", lambda fl: L.CEDice(from_logits=fl), "sparse"),
]


@pytest.mark.parametrize("name,make,labels", EXTREME_LOSSES, ids=[e[0] for e in EXTREME_LOSSES])
@pytest.mark.parametrize("from_logits", [True, False])
def test_extreme_inputs_are_finite(device, name, make, labels, from_logits):
    if from_logits:
        y = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [1e4, 1e4, -1e4]], np.float32)
    else:
        y = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    ids = np.array([1, 0, 2])
    y_true = np.eye(3)[ids] if labels == "dense" else ids
    x = mc.Tensor(to_device(y, device), requires_grad=True)
    out = make(from_logits)(to_device(y_true, device), x)
    out.backward()
    assert np.isfinite(out.item()) and np.all(np.isfinite(to_numpy(x.grad)))


def test_a_confident_wrong_logit_costs_its_size():
    assert L.BinaryCrossentropy(from_logits=True)([[0.0]], [[1e4]]).item() == pytest.approx(1e4)
    assert L.SparseCategoricalCrossentropy(from_logits=True)(
        [1], np.array([[1e4, -1e4]])).item() == pytest.approx(2e4)


# ============================================================================== devices
@pytest.mark.parametrize("make,sparse", [
    (lambda: L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=3), True),
    (lambda: L.CEDice(from_logits=True, class_weight=[1.0, 2.0, 0.5]), True),
    (lambda: L.CategoricalFocalCrossentropy(from_logits=True, alpha=[0.2, 0.3, 0.5]), False),
    (lambda: L.BinaryFocalCrossentropy(), False),
    (lambda: L.Dice(axis=(1, 2)), False),
])
def test_device_matches_cpu(device, rng, make, sparse):
    y_true = rng.integers(0, 3, (2, 3, 3)) if sparse else np.eye(3)[rng.integers(0, 3, (2, 3))]
    y_pred = rng.uniform(0.05, 1, (2, 3, 3, 3) if sparse else (2, 3, 3)).astype(np.float32)
    weight = rng.uniform(0, 2, y_pred.shape[:-1] if sparse else (2,)).astype(np.float32)
    results = []
    for where in ("cpu", device):
        x = mc.Tensor(to_device(y_pred, where), requires_grad=True)
        out = make()(y_true, x, sample_weight=weight)                # host labels move over
        out.backward()
        results.append((out.item(), to_numpy(x.grad)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


# ============================================================================== bad inputs
def test_sparse_labels_out_of_range_raise():
    with pytest.raises(ValueError, match=r"label 3.*\[0, 3\)"):
        L.SparseCategoricalCrossentropy()(np.array([0, 3]), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"label -1"):
        L.SparseCategoricalCrossentropy()(np.array([0, -1]), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="fractional|label 0.5"):
        L.SparseCategoricalCrossentropy()(np.array([0, 0.5]), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="label 7"):
        L.CEDice(ignore_class=255)(np.array([[255, 7]]), np.full((1, 2, 3), 1 / 3))


def test_one_hot_labels_given_to_a_sparse_loss_raise():
    with pytest.raises(ValueError, match="looks one-hot"):
        L.SparseCategoricalCrossentropy()(np.eye(3)[[0, 1]], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="looks one-hot"):
        L.get("sparse_categorical_crossentropy")(np.eye(3)[np.zeros((1, 2, 2), int)],
                                                 np.full((1, 2, 2, 3), 1 / 3))


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match=r"SparseCategoricalCrossentropy.*\(2, 5\).*\(2, 4\)"):
        L.SparseCategoricalCrossentropy()(np.zeros((2, 5), int), np.full((2, 4, 3), 1 / 3))
    with pytest.raises(ValueError, match="must have the same shape.*SparseCategoricalCrossentropy"):
        L.CategoricalCrossentropy()(np.zeros((2, 4), int), np.full((2, 4, 3), 1 / 3))
    with pytest.raises(ValueError, match="must have the same shape"):
        L.CategoricalCrossentropy()(LABELS3, P3)                       # Keras' own shape test
    with pytest.raises(ValueError, match="must have the same shape"):
        L.BinaryCrossentropy()(LABELS3, P3)
    with pytest.raises(ValueError, match="Dice.*same shape"):
        L.Dice()(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="MeanSquaredError.*same shape"):
        L.MeanSquaredError()(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"sample_weight of shape \(3,\)"):
        L.SparseCategoricalCrossentropy()(np.zeros((2, 4), int), np.full((2, 4, 3), 1 / 3),
                                          sample_weight=np.ones(3))


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="reduction"):
        L.SparseCategoricalCrossentropy(reduction="average")
    with pytest.raises(ValueError, match=r"class_weight must hold one value per class \(3\)"):
        L.SparseCategoricalCrossentropy(class_weight=[1, 2])(np.zeros(2, int), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"alpha must hold one value per class \(3\)"):
        L.CategoricalFocalCrossentropy(alpha=[0.5, 0.5])(np.eye(3)[[0]], np.ones((1, 3)))
    with pytest.raises(ValueError, match="label_smoothing"):
        L.BinaryCrossentropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="axis=3 is out of range"):
        L.SparseCategoricalCrossentropy(axis=3)(np.zeros((2, 4), int), np.ones((2, 4, 3)))


# ============================================================================== get / config / functions
@pytest.mark.parametrize("name,cls", [
    ("sparse_categorical_crossentropy", L.SparseCategoricalCrossentropy),
    ("binary_crossentropy", L.BinaryCrossentropy), ("mse", L.MeanSquaredError),
    ("categorical_crossentropy", L.CategoricalCrossentropy), ("dice", L.Dice),
    ("focal", L.BinaryFocalCrossentropy), ("categorical_focal_crossentropy",
                                           L.CategoricalFocalCrossentropy),
    ("ce_dice", L.CEDice), ("SparseCategoricalCrossentropy", L.SparseCategoricalCrossentropy)])
def test_get_by_name(name, cls):
    assert type(L.get(name)) is cls


def test_get_passes_options_and_objects_through():
    assert L.get("scce", from_logits=True).from_logits is True
    loss = L.Dice()
    assert L.get(loss) is loss and L.get(None) is None
    with pytest.raises(ValueError, match="unknown loss 'hinge_of_doom'"):
        L.get("hinge_of_doom")


@pytest.mark.parametrize("loss", [
    L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=2, class_weight=[1, 2, 3]),
    L.CategoricalFocalCrossentropy(alpha=[0.1, 0.2, 0.7], gamma=1.5, label_smoothing=0.1),
    L.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.4, reduction="sum"),
    L.CEDice(from_logits=True, dice_weight=0.3, smooth=0.5), L.Dice(axis=(1, 2))])
def test_config_round_trip(loss):
    again = L.get(L.serialize(loss))
    assert type(again) is type(loss) and again.get_config() == loss.get_config()
    rng = np.random.default_rng(7)
    y_pred = rng.uniform(0.05, 1, (2, 3, 3))
    y_true = rng.integers(0, 3, (2, 3)) if isinstance(loss, L.SparseCategoricalCrossentropy) \
        else np.eye(3)[rng.integers(0, 3, (2, 3))]
    assert again(y_true, y_pred).item() == loss(y_true, y_pred).item()


def test_functions_return_per_sample_values():
    assert L.sparse_categorical_crossentropy([1, 2], DOC_P).shape == (2,)
    np.testing.assert_allclose(L.categorical_crossentropy(DOC_T, DOC_P).numpy(), [0.0513, 2.303],
                               atol=1e-3)
    assert L.dice(DICE_T, DICE_P).shape == ()
    assert L.mean_squared_error(MSE_T, MSE_P).shape == (2,)
    y = mc.Tensor(DOC_P)
    assert not L.binary_crossentropy(DOC_T, y).requires_grad      # no gradient asked, none built
