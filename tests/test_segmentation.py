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


# --------------------------------------------------------------------------- counts over thresholds

def hand_example():
    """Truth A 16 px, B 16 px, C 20 px; predictions a (12 px inside A), b (B moved one column), d (9 px
    on the background)."""
    true = squares((20, 20), [(0, 4, 0, 4), (10, 14, 10, 14), (0, 2, 10, 20)])
    pred = squares((20, 20), [(0, 4, 0, 3), (10, 14, 11, 15), (16, 19, 0, 3)])
    return true, pred


def test_instance_counts_by_hand():
    true, pred = hand_example()
    # IoU(A, a) = 12 / 16 = 0.75; IoU(B, b) = (4 * 3) / (16 + 16 - 12) = 12 / 20 = 0.6; C unmatched;
    # d matches nothing. A pair matches when IoU > t (strictly), so:
    #   t = 0.5, 0.55:       TP 2 (a, b), FP 1 (d), FN 1 (C)   AP(t) = 2 / 4 = 0.5
    #   t = 0.6, 0.65, 0.7:  TP 1 (a),    FP 2,     FN 2       AP(t) = 1 / 5 = 0.2
    #   t = 0.75 ... 0.95:   TP 0,        FP 3,     FN 3       AP(t) = 0
    expected = [[2, 1, 1]] * 2 + [[1, 2, 2]] * 3 + [[0, 3, 3]] * 5
    np.testing.assert_array_equal(seg.instance_counts(true, pred), expected)
    f1, ap = seg.scores_from_counts(seg.instance_counts(true, pred))
    assert f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))                  # 4 / 6
    assert ap == pytest.approx((2 * 0.5 + 3 * 0.2) / 10)                 # 0.16
    assert seg.mean_average_precision(true, pred) == pytest.approx(0.16)
    pairs, missed, false = seg.matches(true, pred, 0.5)
    np.testing.assert_array_equal(pairs, [[1, 1], [2, 2]])
    np.testing.assert_array_equal(missed, [3])
    np.testing.assert_array_equal(false, [3])
    pairs, missed, false = seg.matches(true, pred, 0.7)
    np.testing.assert_array_equal(pairs, [[1, 1]])
    np.testing.assert_array_equal(missed, [2, 3])
    np.testing.assert_array_equal(false, [2, 3])


def test_an_iou_of_exactly_one_half_does_not_match():
    true = squares((4, 8), [(0, 4, 0, 4)])                             # 16 px
    pred = squares((4, 8), [(0, 4, 0, 2), (0, 4, 4, 8)])               # 8 px inside: IoU 8 / 16
    assert seg.instance_counts(true, pred, thresholds=[0.5]).tolist() == [[0, 2, 1]]
    assert seg.instance_counts(true, pred, thresholds=[0.45]).tolist() == [[1, 1, 0]]


def test_ignored_objects_and_the_predictions_mostly_on_them():
    # truth: A (rows 0..3, cols 0..3, 16 px) is scored, E (rows 6..9, cols 0..3, 16 px) ignored.
    true = squares((10, 12), [(0, 4, 0, 4), (6, 10, 0, 4)])
    pred = np.zeros((10, 12), dtype=np.int64)
    pred[0:4, 0:4] = 1      # a = A: a true positive
    pred[6:9, 1:5] = 2      # e: 12 px, 9 of them on E (more than half): left out of the score
    pred[9, 0:8] = 3        # f: 8 px, 4 on E (exactly half: kept), IoU with E 4 / 20: a false positive
    pred[0:2, 9:11] = 4     # g: 4 px on the background: a false positive
    assert seg.instance_counts(true, pred, thresholds=[0.5], ignore=[2]).tolist() == [[1, 2, 0]]
    # without ignore: E is a miss and e a false positive too
    assert seg.instance_counts(true, pred, thresholds=[0.5]).tolist() == [[1, 3, 1]]
    pairs, missed, false = seg.matches(true, pred, 0.5, ignore=[2])
    assert pairs.tolist() == [[1, 1]] and missed.size == 0 and false.tolist() == [3, 4]


@given(boxes=boxes_strategy, shift=st.integers(-2, 2))
def test_counts_of_two_images_add_up_to_the_counts_of_both_side_by_side(boxes, shift):
    left = squares((18, 18), boxes)
    right = np.roll(left, shift, axis=1)
    right[:, :max(shift, 0)] = 0
    gap = np.zeros((18, 1), dtype=np.int64)
    both_true = np.concatenate([left, gap, right + np.where(right > 0, 100, 0)], axis=1)
    both_pred = np.concatenate([right, gap, left + np.where(left > 0, 100, 0)], axis=1)
    summed = seg.instance_counts(left, right) + seg.instance_counts(right, left)
    np.testing.assert_array_equal(seg.instance_counts(both_true, both_pred), summed)


def test_scores_from_counts_edge_cases_and_bad_input():
    assert seg.scores_from_counts([[0, 0, 0]] * 10) == (1.0, 1.0)     # nothing to find, nothing found
    assert seg.scores_from_counts([[0, 0, 5]] * 10) == (0.0, 0.0)
    with pytest.raises(ValueError, match=r"scores_from_counts.*\(T, 3\).*\(3,\)"):
        seg.scores_from_counts([1, 2, 3])
    with pytest.raises(ValueError, match="matches: threshold must be >= 0.5"):
        seg.matches(np.zeros((3, 3), int), np.zeros((3, 3), int), 0.3)


# --------------------------------------------------------------------------- watershed, targets, flips

def two_touching_discs(radius=10, gap=0):
    """Two discs of ``radius`` side by side in (2 r + 6, 4 r + 8 + gap); the second may overlap
    the first by a lens when gap < 0 (the first keeps it)."""
    h, w = 2 * radius + 6, 4 * radius + 8 + gap
    y, x = np.mgrid[:h, :w]
    c1, c2 = radius + 3, 3 * radius + 5 + gap
    labels = np.zeros((h, w), dtype=np.int64)
    labels[(y - h // 2) ** 2 + (x - c2) ** 2 <= radius ** 2] = 2
    labels[(y - h // 2) ** 2 + (x - c1) ** 2 <= radius ** 2] = 1
    return labels


@pytest.mark.parametrize("gap", [-1, -3, -5])
def test_watershed_splits_two_touching_discs(gap):
    labels = two_touching_discs(10, gap)
    mask = labels > 0
    assert ndimage.label(mask)[1] == 1                                 # one blob: they touch
    distance = ndimage.distance_transform_edt(mask)
    found = seg.watershed_instances(mask.astype(float), distance / distance.max(),
                                    fg_threshold=0.5, marker_threshold=0.7, min_size=1)
    assert found.max() == 2
    assert (found > 0).sum() == mask.sum()                             # every pixel claimed
    iou = seg.match_instances(labels, found)
    assert iou.max(axis=1).min() > 0.9
    # connected components merge them: the baseline the watershed improves on
    assert seg.instances_from_two_class(mask, min_size=1).max() == 1


def test_watershed_where_scipy_watershed_ift_floods_the_wrong_basin():
    # elevation profile 3 2 1 0 1 2 3 3 2 1 0 1 2 3 (markers = 1 - profile / 3), a seed in each minimum:
    # each basin fills its own valley, the two meet between the two 3s (columns 6 | 7).
    profile = np.array([3, 2, 1, 0, 1, 2, 3, 3, 2, 1, 0, 1, 2, 3], dtype=float)
    markers = np.tile(1 - profile / 3, (3, 1))
    found = seg.watershed_instances(np.ones_like(markers), markers, 0.5, 0.9, min_size=1)
    np.testing.assert_array_equal(found, np.tile([1] * 7 + [2] * 7, (3, 1)))


def test_watershed_splits_a_plateau_half_way_and_keeps_unmarked_blobs():
    fg = np.zeros((5, 20))
    fg[:, :12] = 1.0                                                   # a 5 x 12 blob ...
    fg[1:4, 15:18] = 1.0                                               # ... and a 3 x 3 one
    markers = np.full((5, 20), 0.4)                                    # flat: one plateau
    markers[2, 0] = markers[2, 11] = 0.9                               # seeds at both ends
    found = seg.watershed_instances(fg, markers, 0.5, 0.5, min_size=1)
    # the two seeds grow at the same pace inside the plateau: 6 columns each
    assert (found[:, :6] == found[2, 0]).all() and (found[:, 6:12] == found[2, 11]).all()
    assert found[2, 0] != found[2, 11]
    assert found[2, 16] > 0 and len(np.unique(found[1:4, 15:18])) == 1  # no seed: its own object
    assert found.max() == 3
    assert seg.watershed_instances(fg, markers, 0.5, 0.5, min_size=10).max() == 2  # 9 px dropped
    with pytest.raises(ValueError, match=r"watershed_instances.*\(5, 20\).*\(5, 19\)"):
        seg.watershed_instances(fg, markers[:, :19])
    with pytest.raises(TypeError, match="watershed_instances: markers must be a float map"):
        seg.watershed_instances(fg, (markers > 0.5).astype(int))


def test_unet_weight_map_by_hand():
    # one row: object 1 at columns 0-1, object 2 at columns 5-6, background 2-4. Every gap pixel
    # has d1 + d2 = 4 (e.g. column 2: 1 to object 1, 3 to object 2); inside object 1, column 0:
    # d1 = 0, d2 = 5 (to column 5); column 1: d2 = 4.
    labels = np.array([[1, 1, 0, 0, 0, 2, 2]])
    w = seg.unet_weight_map(labels, w0=10.0, sigma=2.0)
    term = lambda d: 10.0 * np.exp(-d * d / (2 * 2.0 ** 2))            # noqa: E731
    np.testing.assert_allclose(w[0], 1.0 + term(np.array([5, 4, 4, 4, 4, 4, 5], dtype=float)))
    # class weights add w_c of each pixel's class
    w = seg.unet_weight_map(labels, w0=0.0, sigma=2.0, class_weight=[0.5, 3.0])
    np.testing.assert_allclose(w[0], [3.0, 3.0, 0.5, 0.5, 0.5, 3.0, 3.0])
    # a single object has no second one: only w_c
    np.testing.assert_allclose(seg.unet_weight_map(np.array([[0, 1, 1, 0]])), 1.0)


@given(boxes=boxes_strategy, sigma=st.sampled_from([1.0, 2.0, 3.0]))
def test_unet_weight_map_matches_the_definition(boxes, sigma):
    labels = squares((18, 18), boxes)
    ids = [k for k in np.unique(labels) if k > 0]
    w = seg.unet_weight_map(labels, w0=10.0, sigma=sigma)
    if len(ids) < 2:
        np.testing.assert_allclose(w, 1.0)
        return
    # the definition over the whole image: per object its distance map, then the two smallest
    d = np.sort(np.stack([ndimage.distance_transform_edt(labels != k) for k in ids]), axis=0)
    expected = 1.0 + 10.0 * np.exp(-(d[0] + d[1]) ** 2 / (2 * sigma ** 2))
    np.testing.assert_allclose(w, expected, rtol=0, atol=10.0 * np.exp(-8.0) + 1e-12)


def test_distance_target_by_hand():
    labels = np.zeros((9, 12), dtype=np.int64)
    labels[2:7, 2:7] = 1                                               # a 5 x 5 square
    labels[0:3, 9:12] = 2                                              # a 3 x 3 square in a corner
    target = seg.distance_target(labels)
    # square: the centre is 3 px from the background, the ring next to the rim 2, the rim 1
    assert target[4, 4] == 1.0
    assert target[3, 3] == pytest.approx(2 / 3) and target[2, 2] == pytest.approx(1 / 3)
    # corner square: the image edge is no boundary, so the corner pixel is the farthest (3 px)
    assert target[0, 11] == 1.0 and target[2, 9] == pytest.approx(1 / 3)
    assert (target[labels == 0] == 0).all()


def test_flip_average_of_an_equivariant_predictor_is_the_predictor(rng):
    image = rng.random((6, 9, 2)).astype(np.float32)                  # not square: transposes show
    def pixelwise(x):
        return np.concatenate([x, x ** 2, x[..., :1] * x[..., 1:]], axis=-1)
    for flips in (1, 2, 4, 8):
        np.testing.assert_allclose(seg.flip_average(pixelwise, image, flips), pixelwise(image),
                                   rtol=1e-6)


def test_flip_average_undoes_each_flip():
    image = np.zeros((4, 6, 1), dtype=np.float32)
    def row_index(x):                                                  # where each pixel sits now
        return np.broadcast_to(np.arange(x.shape[0], dtype=float)[:, None, None], x.shape)
    np.testing.assert_allclose(seg.flip_average(row_index, image, 2)[..., 0], row_index(image)[..., 0])
    # with the row flip, every row is seen at r and at 3 - r: the mean is 1.5 everywhere
    np.testing.assert_allclose(seg.flip_average(row_index, image, 4), 1.5)
    # the transposes see columns as rows: (0 + 5) / 2 = 2.5 there; overall (1.5 + 2.5) / 2
    np.testing.assert_allclose(seg.flip_average(row_index, image, 8), 2.0)
    with pytest.raises(ValueError, match="flip_average: flips must be 1, 2, 4 or 8"):
        seg.flip_average(row_index, image, 3)
