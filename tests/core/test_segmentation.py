"""minicnn.segmentation: 3-class masks <-> instances, and the DSB 2018 object metrics."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy import ndimage

from minicnn import segmentation as seg
from minicnn.data import nuclei, nuclei_instances


def squares(shape, boxes):
    """Instance map with object k + 1 filling boxes[k] = (r0, r1, c0, c1) (later boxes on top)."""
    labels = np.zeros(shape, dtype=np.int64)
    for k, (r0, r1, c0, c1) in enumerate(boxes):
        labels[r0:r1, c0:c1] = k + 1
    return labels


def border_reference(labels, width):
    """The definition, pixel by pixel: a foreground pixel is border when a pixel within Euclidean
    distance `width` (indices clamped to the image: the edge is extended) has another label."""
    h, w = labels.shape
    out = np.zeros_like(labels)
    for r in range(h):
        for c in range(w):
            if labels[r, c] == 0:
                continue
            out[r, c] = 1
            for dr in range(-width, width + 1):
                for dc in range(-width, width + 1):
                    if dr * dr + dc * dc > width * width:
                        continue
                    q = labels[min(max(r + dr, 0), h - 1), min(max(c + dc, 0), w - 1)]
                    if q != labels[r, c]:
                        out[r, c] = 2
    return out


boxes_strategy = st.lists(
    st.tuples(st.integers(0, 14), st.integers(1, 8), st.integers(0, 14), st.integers(1, 8)),
    min_size=1, max_size=5).map(lambda bs: [(r, min(r + h, 18), c, min(c + w, 18)) for r, h, c, w in bs])


# --------------------------------------------------------------------------- classes_from_instances

@given(boxes=boxes_strategy, width=st.integers(1, 3))
def test_classes_from_instances_matches_the_pixel_definition(boxes, width):
    labels = squares((18, 18), boxes)
    np.testing.assert_array_equal(seg.classes_from_instances(labels, width), border_reference(labels, width))


@given(boxes=boxes_strategy, width=st.integers(1, 3))
def test_border_separates_touching_objects(boxes, width):
    labels = squares((18, 18), boxes)
    interior = seg.classes_from_instances(labels, width) == 1
    blobs, n = ndimage.label(interior, structure=np.ones((3, 3)))     # 8-connected: the strict test
    for k in range(1, n + 1):
        assert len(np.unique(labels[blobs == k])) == 1


def test_border_of_two_touching_squares():
    labels = squares((10, 12), [(2, 8, 1, 6), (2, 8, 6, 11)])          # they share the column 5|6
    classes = seg.classes_from_instances(labels, border_width=1)
    assert (classes[2:8, 5] == 2).all() and (classes[2:8, 6] == 2).all()
    assert (classes[3:7, 2:5] == 1).all() and (classes[3:7, 7:10] == 1).all()
    assert (classes[labels == 0] == 0).all()


def test_classes_from_instances_bad_input():
    with pytest.raises(ValueError, match="border_width"):
        seg.classes_from_instances(np.zeros((4, 4), int), border_width=0)
    with pytest.raises(ValueError, match="classes_from_instances.*2-D"):
        seg.classes_from_instances(np.zeros((2, 4, 4), int))
    with pytest.raises(TypeError, match="integer"):
        seg.classes_from_instances(np.zeros((4, 4)))


# --------------------------------------------------------------------------- instances

def test_two_touching_squares_become_two_instances():
    labels = squares((12, 16), [(2, 10, 1, 8), (2, 10, 8, 15)])
    classes = seg.classes_from_instances(labels, border_width=1)
    assert ndimage.label(classes > 0)[1] == 1                          # one blob without the border
    found = seg.instances(classes, min_size=1)
    assert found.max() == 2
    assert seg.f1_at(labels, found) == 1.0
    assert seg.mean_average_precision(labels, found) == 1.0
    merged = seg.instances_from_two_class(labels > 0, min_size=1)
    assert merged.max() == 1


@given(boxes=boxes_strategy, width=st.integers(1, 2))
def test_instances_invert_classes_from_instances(boxes, width):
    labels = squares((18, 18), boxes)
    classes = seg.classes_from_instances(labels, width)
    found = seg.instances(classes, min_size=1)
    assert ((found > 0) == (labels > 0)).all()                       # every nucleus pixel is claimed
    seeds, n_seeds = ndimage.label(classes == 1)
    for k in range(1, n_seeds + 1):                                   # a seed keeps one id, one object
        assert len(np.unique(found[seeds == k])) == 1
    for k in np.unique(labels)[1:]:
        obj = labels == k
        ring = ndimage.binary_dilation(obj, np.ones((3, 3))) & ~obj
        isolated = not (labels[ring] > 0).any()
        if isolated and ndimage.label(obj & (classes == 1))[1] == 1:
            # an object alone, with one interior piece, comes back exactly
            ids = np.unique(found[obj])
            assert len(ids) == 1 and (found == ids[0]).sum() == obj.sum()


def test_instances_from_the_true_nuclei_mask():
    truth = nuclei_instances("all")
    classes = nuclei(classes=3, split="all").mask
    found = seg.instances(classes)
    assert seg.f1_at(truth, found) > 0.99
    assert seg.mean_average_precision(truth, found) > 0.95
    # without the border class, touching nuclei merge
    assert seg.f1_at(truth, seg.instances_from_two_class(classes > 0)) < 0.95


def test_instances_accepts_class_scores_and_drops_small_objects(rng):
    labels = squares((20, 20), [(1, 9, 1, 9), (12, 14, 12, 14)])        # 64 px and 4 px
    classes = seg.classes_from_instances(labels, 1)
    scores = rng.random((20, 20, 3)) * 0.5
    scores[np.arange(20)[:, None], np.arange(20)[None, :], classes] += 1.0
    np.testing.assert_array_equal(seg.instances(scores, min_size=1), seg.instances(classes, min_size=1))
    kept = seg.instances(classes, min_size=5)
    assert kept.max() == 1 and (kept[1:9, 1:9] == 1).all() and (kept[12:14, 12:14] == 0).all()


def test_instances_bad_input():
    with pytest.raises(ValueError, match=r"instances.*0\.\.2"):
        seg.instances(np.full((4, 4), 3))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        seg.instances(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match=r"instances_from_two_class.*\(H, W, 2\)"):
        seg.instances_from_two_class(np.zeros((4, 4, 3)))


# --------------------------------------------------------------------------- metrics

def test_iou_matrix_by_hand():
    true = squares((10, 10), [(0, 4, 0, 4), (6, 8, 6, 8)])             # 16 px, 4 px
    pred = squares((10, 10), [(1, 5, 0, 4), (6, 8, 6, 7)])             # 12 px overlap / 20; 2 / 4
    pred = np.where(pred == 1, 7, np.where(pred == 2, 3, 0))           # ids need not be consecutive
    iou = seg.match_instances(true, pred)
    # columns follow sorted predicted ids: 3 then 7
    np.testing.assert_allclose(iou, [[0.0, 12 / 20], [2 / 4, 0.0]])


def test_known_f1_and_average_precision():
    true = squares((20, 20), [(0, 4, 0, 4), (10, 14, 10, 14)])
    pred = squares((20, 20), [(0, 4, 0, 4), (11, 15, 10, 14), (16, 19, 0, 3)])
    # pred 1 is exact (IoU 1), pred 2 overlaps true 2 with IoU 12 / 20 = 0.6, pred 3 is a false positive
    assert seg.match_counts(true, pred, 0.5) == (2, 1, 0)
    assert seg.f1_at(true, pred, 0.5) == pytest.approx(4 / 5)
    assert seg.f1_at(true, pred, 0.7) == pytest.approx(2 / 5)
    # t = 0.5, 0.55: TP 2 FP 1 FN 0 -> 2/3; t = 0.6 ... 0.95 (IoU must exceed t): TP 1 FP 2 FN 1 -> 1/4
    assert seg.mean_average_precision(true, pred) == pytest.approx((2 * 2 / 3 + 8 * 1 / 4) / 10)
    assert seg.mean_average_precision(true, pred, thresholds=[0.5]) == pytest.approx(2 / 3)


def test_low_thresholds_match_one_to_one():
    true = squares((4, 8), [(0, 4, 0, 4), (0, 4, 4, 8)])               # two 16 px halves
    pred = squares((4, 8), [(0, 4, 2, 6)])                             # 8 px of each: IoU 8/24 = 1/3
    assert seg.match_counts(true, pred, 0.3) == (1, 0, 1)
    assert seg.match_counts(true, pred, 0.5) == (0, 1, 2)


def test_metrics_edge_cases():
    empty = np.zeros((6, 6), dtype=np.int64)
    one = squares((6, 6), [(1, 4, 1, 4)])
    assert seg.f1_at(empty, empty) == 1.0 and seg.mean_average_precision(empty, empty) == 1.0
    assert seg.f1_at(one, empty) == 0.0 and seg.mean_average_precision(one, empty) == 0.0
    assert seg.f1_at(empty, one) == 0.0
    assert seg.match_instances(one, empty).shape == (1, 0)


@given(boxes=boxes_strategy, seed=st.integers(0, 2**16))
def test_metrics_ignore_how_ids_are_numbered(boxes, seed):
    labels = squares((18, 18), boxes)
    ids = np.unique(labels)[1:]
    renamed = np.zeros_like(labels)
    for old, new in zip(ids, np.random.default_rng(seed).permutation(len(ids)) * 5 + 11):
        renamed[labels == old] = new
    assert seg.f1_at(labels, renamed) == 1.0
    assert seg.mean_average_precision(renamed, labels) == 1.0


def test_metrics_bad_input():
    a = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"match_instances.*\(4, 4\).*\(4, 5\)"):
        seg.match_instances(a, np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(TypeError, match="match_instances.*integer"):
        seg.match_instances(a, a.astype(float))
    with pytest.raises(ValueError, match=">= 0"):
        seg.f1_at(a - 1, a)
    with pytest.raises(ValueError, match="threshold"):
        seg.f1_at(a, a, threshold=1.0)
