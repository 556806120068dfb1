"""minicnn.metrics: hand-made masks with IoU / Dice known by hand, Keras' documented values,
streaming equals one pass, the input forms, devices and bad inputs."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minicnn as mc
from minicnn import metrics as M
from kernels.backend import to_device

# A 2x4 image, 3 classes, counted by hand:
#   true  0 0 1 1      pred  0 1 1 1
#         2 2 2 0            2 2 0 0
# class 0: TP 2 (0,0),(1,3); FP 1 (1,2); FN 1 (0,1)   IoU 2/4   Dice 4/6
# class 1: TP 2;             FP 1 (0,1); FN 0         IoU 2/3   Dice 4/5
# class 2: TP 2;             FP 0;       FN 1 (1,2)   IoU 2/3   Dice 4/5
TRUE = np.array([[[0, 0, 1, 1], [2, 2, 2, 0]]])
PRED = np.array([[[0, 1, 1, 1], [2, 2, 0, 0]]])
IOU = [2 / 4, 2 / 3, 2 / 3]
DICE = [4 / 6, 4 / 5, 4 / 5]


def scores_for(labels, n_classes, logits=False):
    """Scores whose argmax is ``labels``: probabilities, or logits (log of them)."""
    p = np.full(labels.shape + (n_classes,), 0.1)
    np.put_along_axis(p, labels[..., None], 0.8, axis=-1)
    return np.log(p) if logits else p


def test_hand_counted_masks():
    iou, dice, acc = M.MeanIoU(3), M.DiceCoefficient(3), M.PixelAccuracy()
    for m in (iou, dice, acc):
        m.update_state(TRUE, PRED)
    np.testing.assert_allclose(iou.per_class(), IOU, rtol=1e-12)
    np.testing.assert_allclose(dice.per_class(), DICE, rtol=1e-12)
    assert iou.result() == pytest.approx(np.mean(IOU), rel=1e-6)
    assert dice.result() == pytest.approx(np.mean(DICE), rel=1e-12)
    assert acc.result() == pytest.approx(6 / 8)
    np.testing.assert_array_equal(iou.confusion_matrix(), [[2, 1, 0], [0, 2, 0], [1, 0, 2]])


def test_keras_documented_values():
    m = M.MeanIoU(num_classes=2)
    m.update_state([0, 0, 1, 1], [0, 1, 0, 1])
    assert m.result() == pytest.approx(0.33333334, abs=1e-7)
    m.reset_state()
    m.update_state([0, 0, 1, 1], [0, 1, 0, 1], sample_weight=[0.3, 0.3, 0.3, 0.1])
    assert m.result() == pytest.approx(0.23809525, abs=1e-6)
    # OneHotMeanIoU's example, with y_true given as ids and y_pred as scores
    y_true = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0]]).argmax(-1)
    y_pred = np.array([[0.2, 0.3, 0.5], [0.1, 0.2, 0.7], [0.5, 0.3, 0.1], [0.1, 0.4, 0.5]])
    m = M.MeanIoU(num_classes=3)
    m.update_state(y_true, y_pred, sample_weight=[0.1, 0.2, 0.3, 0.4])
    assert m.result() == pytest.approx(0.1 / 0.7 / 3, abs=1e-6)      # Keras shows 0.048
    # BinaryIoU's example: threshold 0.3, predictions >= threshold are class 1
    m = M.MeanIoU(num_classes=2, threshold=0.3)
    m.update_state([0, 1, 0, 1], [0.1, 0.2, 0.4, 0.7], sample_weight=[0.2, 0.3, 0.4, 0.1])
    assert m.result() == pytest.approx(0.17361112, abs=1e-6)


def test_classes_absent_from_both_masks_leave_the_mean():
    m, d = M.MeanIoU(4), M.DiceCoefficient(4)        # class 3 appears nowhere
    for metric in (m, d):
        metric.update_state(TRUE, PRED)
    assert np.isnan(m.per_class()[3]) and np.isnan(d.per_class()[3])
    assert m.result() == pytest.approx(np.mean(IOU), rel=1e-6)
    assert d.result() == pytest.approx(np.mean(DICE), rel=1e-12)
    # a class only predicted (never true) counts, with IoU 0
    m = M.MeanIoU(2)
    m.update_state(np.zeros((1, 2, 2), int), np.array([[[0, 1], [0, 0]]]))
    assert m.result() == pytest.approx((3 / 4 + 0) / 2, rel=1e-6)


@pytest.mark.parametrize("form", ["labels", "probabilities", "logits", "labels_channel",
                                  "tensor"])
def test_input_forms_agree(form):
    y_pred = {"labels": PRED, "probabilities": scores_for(PRED, 3),
              "logits": scores_for(PRED, 3, logits=True), "labels_channel": PRED[..., None],
              "tensor": mc.Tensor(scores_for(PRED, 3))}[form]
    y_true = TRUE[..., None] if form == "labels_channel" else TRUE
    m = M.MeanIoU(3)
    m.update_state(y_true, y_pred)
    np.testing.assert_allclose(m.per_class(), IOU, rtol=1e-12)


@pytest.mark.parametrize("from_logits", [False, True])
def test_single_channel_is_thresholded(from_logits):
    true = np.array([[[1, 0], [1, 1]]])
    p = np.array([[[0.7, 0.5], [0.2, 0.9]]])                  # >= 0.5 -> class 1
    scores = np.log(p / (1 - p)) if from_logits else p       # logit 0 <-> probability 0.5
    for shape in [(1, 2, 2), (1, 2, 2, 1)]:
        m = M.MeanIoU(from_logits=from_logits)               # num_classes 2 from one channel
        m.update_state(true, scores.reshape(shape))
        assert m.num_classes == 2
        # pred 1 1 / 0 1: class 1 TP 2 FP 1 FN 1 -> 1/2; class 0 TP 0 FP 1 FN 1 -> 0
        np.testing.assert_allclose(m.per_class(), [0.0, 0.5], atol=1e-12)


@given(batches=st.integers(1, 4), classes=st.integers(2, 5), weighted=st.booleans(),
       ignore=st.booleans(), seed=st.integers(0, 2**16))
def test_streaming_equals_one_pass(batches, classes, weighted, ignore, seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, (batches * 2, 3, 4))
    if ignore:
        true[rng.uniform(size=true.shape) < 0.2] = 255
    scores = rng.standard_normal(true.shape + (classes,))
    weight = rng.uniform(0, 2, true.shape) if weighted else None
    kwargs = {"ignore_class": 255 if ignore else None}
    streamed = [M.MeanIoU(classes, **kwargs), M.DiceCoefficient(classes, **kwargs),
                M.PixelAccuracy(**kwargs)]
    whole = [M.MeanIoU(classes, **kwargs), M.DiceCoefficient(classes, **kwargs),
             M.PixelAccuracy(**kwargs)]
    for b in range(batches):
        part = slice(2 * b, 2 * b + 2)
        for m in streamed:
            m.update_state(true[part], scores[part], None if weight is None else weight[part])
    for m in whole:
        m.update_state(true, scores, weight)
    for a, b in zip(streamed, whole):
        assert a.result() == pytest.approx(b.result(), rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(streamed[0].confusion_matrix(), whole[0].confusion_matrix(),
                               rtol=1e-12)


def test_confusion_matrix_matches_a_loop():
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 4, (2, 5, 5)), rng.integers(0, 4, (2, 5, 5))
    weight = rng.uniform(0, 1, (2, 5, 5))
    expected = np.zeros((4, 4))
    for t, p, w in zip(true.ravel(), pred.ravel(), weight.ravel()):
        expected[t, p] += w
    m = M.MeanIoU(4)
    m.update_state(true, pred, sample_weight=weight)
    np.testing.assert_allclose(m.confusion_matrix(), expected, rtol=1e-12)


def test_ignore_class_and_per_image_weights():
    true = TRUE.copy()
    true[0, 0, 0] = 255                                      # a correct pixel of class 0, ignored
    acc = M.PixelAccuracy(ignore_class=255)
    acc.update_state(true, PRED)
    assert acc.result() == pytest.approx(5 / 7)
    m = M.MeanIoU(3, ignore_class=255)
    m.update_state(true, PRED)
    assert m.per_class()[0] == pytest.approx(1 / 3)
    acc = M.PixelAccuracy()
    acc.update_state(np.concatenate([TRUE, TRUE]), np.concatenate([PRED, TRUE]),
                     sample_weight=[3.0, 1.0])               # one weight per image
    assert acc.result() == pytest.approx((3 * 6 + 8) / (3 * 8 + 8))


def test_reset_and_empty_results():
    m = M.MeanIoU(3)
    assert m.result() == 0.0 and M.DiceCoefficient(3).result() == 0.0
    assert M.PixelAccuracy().result() == 0.0
    m.update_state(TRUE, PRED)
    m.reset_state()
    assert m.result() == 0.0
    assert m(TRUE, TRUE) == pytest.approx(1.0, abs=1e-6)    # __call__: update, then result


def test_state_stays_on_the_device(device):
    true = to_device(TRUE, device)
    scores = to_device(scores_for(PRED, 3), device)
    m, d, a = M.MeanIoU(3), M.DiceCoefficient(3), M.PixelAccuracy()
    for metric in (m, d, a):
        metric.update_state(true, scores)
        metric.update_state(TRUE, mc.Tensor(scores))         # host labels meet device scores
    assert type(m._cm).__module__.split(".")[0] == ("cupy" if device == "gpu" else "numpy")
    np.testing.assert_allclose(m.per_class(), IOU, rtol=1e-12)
    assert d.result() == pytest.approx(np.mean(DICE)) and a.result() == pytest.approx(0.75)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"MeanIoU: y_true holds class id 3, outside \[0, 3\)"):
        M.MeanIoU(3).update_state(np.array([[0, 3]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"y_pred holds class id 5"):
        M.MeanIoU(3).update_state(np.array([[0, 1]]), np.array([[0, 5]]))
    with pytest.raises(ValueError, match="has 4 classes.*num_classes=3"):
        M.MeanIoU(3).update_state(TRUE, scores_for(PRED, 4))
    with pytest.raises(ValueError, match=r"DiceCoefficient: y_pred of shape \(1, 3, 4, 3\) does "
                                         r"not match y_true of shape \(1, 2, 4\)"):
        M.DiceCoefficient(3).update_state(TRUE, np.zeros((1, 3, 4, 3)))
    with pytest.raises(ValueError, match="num_classes cannot be inferred"):
        M.MeanIoU().update_state(TRUE, PRED)
    with pytest.raises(ValueError, match="fractional"):
        M.PixelAccuracy().update_state(np.array([0.5, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"sample_weight of shape \(3,\)"):
        M.PixelAccuracy().update_state(TRUE, PRED, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        M.MeanIoU(0)


@pytest.mark.parametrize("name,cls", [("pixel_accuracy", M.PixelAccuracy),
                                      ("accuracy", M.PixelAccuracy), ("mean_iou", M.MeanIoU),
                                      ("dice", M.DiceCoefficient), ("MeanIoU", M.MeanIoU)])
def test_get(name, cls):
    metric = M.get(name)
    assert type(metric) is cls
    if name.islower():
        assert metric.name == name                           # logs say what was asked for


def test_get_infers_classes_and_round_trips():
    m = M.get("mean_iou")
    m.update_state(TRUE, scores_for(PRED, 3))
    assert m.num_classes == 3
    again = M.get(M.serialize(m))
    assert type(again) is M.MeanIoU and again.get_config() == m.get_config()
    assert M.get("dice", num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        M.get("f2")
