"""minicnn.data.ImageDataGenerator: one random transform moves an image and its mask together."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy import ndimage

from kernels.backend import to_device
from minicnn.data import ImageDataGenerator, shapes


def identity_params(**changes):
    params = dict(theta=0.0, tx=0.0, ty=0.0, shear=0.0, zx=1.0, zy=1.0, flip_vertical=False,
                  flip_horizontal=False, brightness=None, elastic=None)
    params.update(changes)
    return params


def label_image(mask):
    """An image that encodes the mask: class k -> intensity k / 3 (piecewise constant)."""
    return (mask[..., None] / 3.0).astype(np.float32)


def mismatch_far_from_edges(image, mask, margin):
    """Pixels where the image's rounded class differs from the mask, farther than `margin` px from a
    label change of the mask or from the image edge (beyond which a change may hide): the pixels
    where bilinear and nearest sampling may rightly disagree."""
    decoded = np.rint(image[..., 0] * 3).astype(np.int64)
    changes = (ndimage.maximum_filter(mask, size=3, mode="constant", cval=-1)
               != ndimage.minimum_filter(mask, size=3, mode="constant", cval=-1))
    near = ndimage.binary_dilation(changes, iterations=margin)
    return (decoded != mask) & ~near


settings_strategy = st.fixed_dictionaries({
    "rotation_range": st.sampled_from([0.0, 30.0, 180.0]),
    "width_shift_range": st.sampled_from([0.0, 0.2, 5]),
    "height_shift_range": st.sampled_from([0.0, 0.2, 7.5]),
    "zoom_range": st.sampled_from([0.0, 0.2, (0.9, 1.3)]),
    "shear_range": st.sampled_from([0.0, 15.0]),
    "horizontal_flip": st.booleans(),
    "vertical_flip": st.booleans(),
    "elastic_sigma": st.sampled_from([0.0, 3.0]),
    "fill_mode": st.sampled_from(["constant", "nearest", "reflect", "wrap"]),
})


@given(settings=settings_strategy, seed=st.integers(0, 2**16))
def test_image_and_mask_stay_aligned(settings, seed):
    _, masks = shapes(2, size=40, seed=seed, shapes_per_image=(2, 4))
    images = np.stack([label_image(m) for m in masks])
    out_images, out_masks = ImageDataGenerator(**settings).transform_batch(images, masks, seed=seed)
    for image, mask in zip(out_images, out_masks):
        assert not mismatch_far_from_edges(image, mask, margin=2).any()
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
    assert out_masks.dtype == masks.dtype and out_images.dtype == np.float32


def test_alignment_check_can_fail():
    # a mask transformed differently from its image is caught
    _, masks = shapes(1, size=40, seed=2, shapes_per_image=(3, 3))
    image = label_image(masks[0])
    gen = ImageDataGenerator()
    moved, _ = gen.apply_transform(image, masks[0], identity_params(theta=20.0))
    assert mismatch_far_from_edges(moved, masks[0], margin=2).any()


def test_masks_keep_only_their_labels(rng):
    mask = rng.choice(np.array([0, 3, 7, 250]), size=(24, 24))
    image = rng.random((24, 24, 2)).astype(np.float32)
    gen = ImageDataGenerator(rotation_range=40, zoom_range=0.3, shear_range=20, elastic_sigma=4,
                             fill_mode="constant", mask_cval=0)
    for seed in range(5):
        _, out = gen.random_transform(image, mask, seed=seed)
        assert out.dtype == mask.dtype and set(np.unique(out)) <= {0, 3, 7, 250}
    one_hot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=(24, 24))]
    _, out = gen.random_transform(image, one_hot, seed=0)
    assert out.shape == (24, 24, 4) and set(np.unique(out)) <= {0.0, 1.0}


@pytest.mark.parametrize("axis, option", [(1, "horizontal_flip"), (0, "vertical_flip")])
def test_flips_are_exact(rng, axis, option):
    image = rng.random((9, 12, 3)).astype(np.float32)
    mask = rng.integers(0, 5, size=(9, 12))
    gen = ImageDataGenerator(**{option: True})
    flipped = 0
    for seed in range(16):
        out_image, out_mask = gen.random_transform(image, mask, seed=seed)
        if np.array_equal(out_mask, mask):
            np.testing.assert_array_equal(out_image, image)
        else:
            np.testing.assert_array_equal(out_mask, np.flip(mask, axis))
            np.testing.assert_array_equal(out_image, np.flip(image, axis))
            flipped += 1
    assert 0 < flipped < 16


@pytest.mark.parametrize("fill_mode", ["constant", "nearest"])
def test_quarter_turns_are_exact(rng, fill_mode):
    image = rng.random((7, 7, 2)).astype(np.float32)
    mask = rng.integers(1, 9, size=(7, 7))
    gen = ImageDataGenerator(fill_mode=fill_mode, cval=-1.0, mask_cval=0)
    # output (r, c) samples input (W - 1 - c, r) for +90 degrees: a quarter turn clockwise
    for theta, turns in [(90.0, -1), (180.0, 2), (-90.0, 1), (270.0, 1)]:
        out_image, out_mask = gen.apply_transform(image, mask, identity_params(theta=theta))
        np.testing.assert_allclose(out_image, np.rot90(image, turns), atol=1e-6)
        np.testing.assert_array_equal(out_mask, np.rot90(mask, turns))


@pytest.mark.parametrize("fill_mode, pad_mode", [("constant", "constant"), ("nearest", "edge"),
                                                 ("reflect", "symmetric"), ("wrap", "wrap")])
def test_integer_shift_and_fill_modes(rng, fill_mode, pad_mode):
    # Keras' fill modes: constant kkkk|abcd|kkkk, nearest aaaa|abcd|dddd, reflect abcddcba|abcd|dcbaabcd,
    # wrap abcdabcd|abcd|abcdabcd; a shift of (tx, ty) makes output[r, c] = input[r + tx, c + ty]
    image = rng.random((6, 8, 1)).astype(np.float32)
    mask = rng.integers(1, 4, size=(6, 8))
    gen = ImageDataGenerator(fill_mode=fill_mode, cval=-1.0, mask_cval=0)
    out_image, out_mask = gen.apply_transform(image, mask, identity_params(tx=2.0, ty=-3.0))
    kw_image = {"constant_values": -1.0} if pad_mode == "constant" else {}
    kw_mask = {"constant_values": 0} if pad_mode == "constant" else {}
    padded_image = np.pad(image, ((0, 2), (3, 0), (0, 0)), mode=pad_mode, **kw_image)
    padded_mask = np.pad(mask, ((0, 2), (3, 0)), mode=pad_mode, **kw_mask)
    np.testing.assert_allclose(out_image, padded_image[2:, :8], atol=1e-6)
    np.testing.assert_array_equal(out_mask, padded_mask[2:, :8])


def test_brightness_changes_the_image_only(rng):
    image = rng.random((8, 8, 1)).astype(np.float32)
    mask = rng.integers(0, 3, size=(8, 8))
    gen = ImageDataGenerator(brightness_range=(0.5, 1.5))
    params = gen.get_random_transform(image.shape, seed=3)
    out_image, out_mask = gen.apply_transform(image, mask, params)
    assert 0.5 <= params["brightness"] <= 1.5
    np.testing.assert_allclose(out_image, image * params["brightness"], rtol=1e-6)
    np.testing.assert_array_equal(out_mask, mask)


def test_zoom_follows_keras():
    # a zoom factor scales the sampled coordinates about the centre: 0.5 doubles the size of things
    mask = np.zeros((9, 9), dtype=np.int64)
    mask[3:6, 3:6] = 1
    gen = ImageDataGenerator(fill_mode="constant")
    _, out = gen.apply_transform(mask[..., None].astype(np.float32), mask, identity_params(zx=0.5, zy=0.5))
    assert (out == 1).sum() > 4 * (mask == 1).sum() * 0.7
    _, out = gen.apply_transform(mask[..., None].astype(np.float32), mask, identity_params(zx=2.0, zy=2.0))
    assert 0 < (out == 1).sum() < (mask == 1).sum()


def test_elastic_field_interpolates_the_coarse_grid(rng):
    coarse = rng.normal(0, 5, size=(2, 3, 3))
    field = ImageDataGenerator._elastic_field(coarse, 33, 65)
    assert field.shape == (2, 33, 65)
    np.testing.assert_allclose(field[:, ::16, ::32], coarse, atol=1e-9)    # grid nodes are kept
    # smooth: neighbouring displacements differ far less than the displacements themselves
    assert np.abs(np.diff(field, axis=2)).max() < 0.2 * np.abs(coarse).max()


def test_elastic_deformation_moves_pixels_and_keeps_alignment():
    _, masks = shapes(1, size=48, seed=7, shapes_per_image=(3, 3))
    image, mask = label_image(masks[0]), masks[0]
    gen = ImageDataGenerator(elastic_sigma=4.0)
    out_image, out_mask = gen.random_transform(image, mask, seed=1)
    assert not np.array_equal(out_mask, mask)
    assert not mismatch_far_from_edges(out_image, out_mask, margin=2).any()


def test_flow_repeats_for_a_seed_and_covers_each_epoch(rng):
    images = rng.random((10, 8, 8, 1)).astype(np.float32)
    masks = rng.integers(0, 3, size=(10, 8, 8))
    gen = ImageDataGenerator(rotation_range=30, horizontal_flip=True, elastic_sigma=2)
    a, b, c = gen.flow(images, masks, 4, seed=11), gen.flow(images, masks, 4, seed=11), gen.flow(
        images, masks, 4, seed=12)
    for _ in range(4):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(xa, xc)
    # no augmentation: an epoch is a permutation of the samples, batches of 4, 4, 2
    plain = ImageDataGenerator().flow(images, masks, 4, seed=0)
    batches = [next(plain) for _ in range(3)]
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    seen = np.concatenate([x for x, _ in batches])
    order = [int(np.flatnonzero((images == s).all(axis=(1, 2, 3)))[0]) for s in seen]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), masks[order])
    ordered = ImageDataGenerator().flow(images, None, 5, shuffle=False)
    np.testing.assert_array_equal(next(ordered), images[:5])


def test_flow_accepts_device_arrays(device, rng):
    images = rng.random((4, 8, 8, 1)).astype(np.float32)
    masks = rng.integers(0, 3, size=(4, 8, 8))
    x, y = next(ImageDataGenerator(vertical_flip=True).flow(
        to_device(images, device), to_device(masks, device), 4, seed=0))
    assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == images.shape


def test_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="fill_mode"):
        ImageDataGenerator(fill_mode="mirror")
    with pytest.raises(ValueError, match="zoom_range"):
        ImageDataGenerator(zoom_range=1.5)
    with pytest.raises(ValueError, match="rotation_range"):
        ImageDataGenerator(rotation_range=-5)
    with pytest.raises(ValueError, match="brightness_range"):
        ImageDataGenerator(brightness_range=(1.2, 0.8))
    gen = ImageDataGenerator()
    with pytest.raises(ValueError, match=r"random_transform.*\(H, W, C\).*\(8, 8\)"):
        gen.random_transform(np.zeros((8, 8)), np.zeros((8, 8), int))
    with pytest.raises(ValueError, match=r"mask.*\(8, 8, 1\).*\(8, 9\)"):
        gen.random_transform(np.zeros((8, 8, 1)), np.zeros((8, 9), int))
    with pytest.raises(ValueError, match=r"flow: masks.*\(2, 8, 8, 1\).*\(3, 8, 8\)"):
        gen.flow(np.zeros((2, 8, 8, 1)), np.zeros((3, 8, 8), int))
    with pytest.raises(ValueError, match="batch_size"):
        gen.flow(np.zeros((2, 8, 8, 1)), None, 0)
