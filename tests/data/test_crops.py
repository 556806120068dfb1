"""minicnn.data.random_crops / tile / untile."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minicnn.data import ImageDataGenerator, nuclei, random_crops, tile, untile


def position_image(height, width, channels=1):
    """Pixel value = its flat index, so any crop tells where it came from; mask = index mod 7."""
    index = np.arange(height * width, dtype=np.float64).reshape(height, width)
    image = np.repeat(index[..., None], channels, axis=2).astype(np.float32)
    return image, (index % 7).astype(np.int64)


def test_crops_are_aligned_windows():
    image, mask = position_image(30, 41, channels=2)
    stream = random_crops(image, mask, crop=8, batch_size=5, seed=0)
    corners = set()
    for _ in range(20):
        x, y = next(stream)
        assert x.shape == (5, 8, 8, 2) and x.dtype == np.float32 and y.shape == (5, 8, 8)
        for crop_x, crop_y in zip(x, y):
            r, c = divmod(int(crop_x[0, 0, 0]), 41)
            corners.add((r, c))
            np.testing.assert_array_equal(crop_x, image[r:r + 8, c:c + 8])
            np.testing.assert_array_equal(crop_y, mask[r:r + 8, c:c + 8])
    rows, cols = zip(*corners)
    assert min(rows) >= 0 and max(rows) <= 22 and max(cols) <= 33 and len(corners) > 50


def test_crops_repeat_for_a_seed_and_sample_a_stack():
    image, mask = position_image(16, 16)
    stack = np.stack([image, image + 1000.0])
    masks = np.stack([mask, mask])
    a, b = random_crops(stack, masks, 4, 3, seed=5), random_crops(stack, masks, 4, 3, seed=5)
    sources = set()
    for _ in range(10):
        (xa, ya), (xb, yb) = next(a), next(b)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        sources |= set((xa[:, 0, 0, 0] >= 1000).tolist())
    assert sources == {False, True}
    c = random_crops(stack, masks, 4, 3, seed=6)
    assert not np.array_equal(next(c)[0], next(random_crops(stack, masks, 4, 3, seed=5))[0])


def test_crops_with_augmentation_keep_labels():
    image, mask = nuclei(classes=3, split="val")
    gen = ImageDataGenerator(rotation_range=90, horizontal_flip=True, elastic_sigma=3)
    x, y = next(random_crops(image, mask, 64, 8, seed=0, augmenter=gen))
    assert x.shape == (8, 64, 64, 1) and y.shape == (8, 64, 64)
    assert set(np.unique(y)) <= {0, 1, 2}


def test_crops_bad_input():
    image, mask = position_image(10, 10)
    with pytest.raises(ValueError, match="random_crops: crop"):
        next(random_crops(image, mask, 11, 2, seed=0))
    with pytest.raises(ValueError, match=r"random_crops.*\(10, 10, 1\).*\(10, 9\)"):
        next(random_crops(image, mask[:, :9], 4, 2, seed=0))


def test_tile_the_nuclei_test_region():
    image, mask = nuclei(classes=3, split="test")
    crops, corners = tile(image, 64)
    assert crops.shape == (8, 64, 64, 1)
    assert corners.tolist() == [[0, c] for c in range(0, 512, 64)]
    np.testing.assert_array_equal(untile(crops, corners, image.shape), image)
    mask_crops, _ = tile(mask, 64)
    np.testing.assert_array_equal(mask_crops[3], mask[:, 192:256])


@given(height=st.integers(5, 40), width=st.integers(5, 40), crop=st.integers(1, 5), data=st.data())
def test_tile_covers_everything_and_untile_inverts(height, width, crop, data):
    stride = data.draw(st.integers(1, crop))
    image, _ = position_image(height, width, channels=3)
    crops, corners = tile(image, crop, stride)
    covered = np.zeros((height, width), dtype=int)
    for (r, c), piece in zip(corners, crops):
        np.testing.assert_array_equal(piece, image[r:r + crop, c:c + crop])
        covered[r:r + crop, c:c + crop] += 1
    assert covered.min() >= 1
    np.testing.assert_allclose(untile(crops, corners, image.shape), image)


def test_untile_averages_overlaps():
    crops = np.stack([np.zeros((4, 4, 1)), np.ones((4, 4, 1))]).astype(np.float32)
    out = untile(crops, np.array([[0, 0], [0, 2]]), (4, 6, 1))
    np.testing.assert_allclose(out[0, :, 0], [0, 0, 0.5, 0.5, 1, 1])
    with pytest.raises(ValueError, match="untile"):
        untile(crops, np.array([[0, 0]]), (4, 6, 1))
    with pytest.raises(ValueError, match="tile: need"):
        tile(np.zeros((4, 6)), 5)


def test_seed_none_follows_the_package_generator():
    minicnn = pytest.importorskip("minicnn")
    if not hasattr(minicnn, "seed"):
        pytest.skip("minicnn.seed is not there yet")
    image, mask = position_image(20, 20)
    gen = ImageDataGenerator(rotation_range=45)
    minicnn.seed(7)
    first = next(random_crops(image, mask, 8, 4, augmenter=gen))
    minicnn.seed(7)
    again = next(random_crops(image, mask, 8, 4, augmenter=gen))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
