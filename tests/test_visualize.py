"""Pictures: valid PNGs written atomically, the crop and error logic, feature maps that equal
the layer's output, and gradient flow (the residual bridge carries the error to the first layers)."""
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from minicnn import visualize as viz


def _decode_rgb_png(path) -> np.ndarray:
    """A minimal reader for the 8-bit RGB, filter-0 PNGs that save_mask writes (no matplotlib)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        payload = data[position + 8:position + 8 + length]
        crc = struct.unpack(">I", data[position + 8 + length:position + 12 + length])[0]
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + payload
        position += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(height, width, 3)


def _check_png(path, min_colours=2) -> np.ndarray:
    """The file is a PNG matplotlib can read, not empty, with more than one colour."""
    image = pytest.importorskip("matplotlib.image")
    assert os.path.getsize(path) > 0
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    picture = image.imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 10 and picture.shape[1] > 10
    colours = np.unique(picture.reshape(-1, picture.shape[-1]), axis=0)
    assert len(colours) >= min_colours
    return picture


def _no_temporaries(folder):
    assert [name for name in os.listdir(folder) if name.startswith(".tmp-")] == []


# -- no matplotlib needed ---------------------------------------------------------------------------
def test_module_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import minicnn.visualize as v\n"
            "assert not v.matplotlib_available()\n"
            "assert all(not m.startswith('matplotlib') or sys.modules[m] is None for m in sys.modules)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_drawing_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(viz, "matplotlib_available", lambda: False)
    with pytest.raises(ImportError, match=r"minicnn\[plot\]"):
        viz.save_training_curves({"loss": [1.0, 0.5]}, tmp_path / "curves.png")
    with pytest.raises(ImportError, match=r"minicnn\[plot\]"):
        viz.read_image(__file__)
    assert not (tmp_path / "curves.png").exists()
    # masks need no matplotlib
    mask = np.array([[0, 1], [2, 1]])
    viz.save_mask(mask, tmp_path / "mask.png", 3)
    assert (tmp_path / "mask.png").exists()


def test_save_mask_writes_the_palette_colours(tmp_path, rng):
    mask = rng.integers(0, 4, size=(7, 9))
    path = viz.save_mask(mask, tmp_path / "sub" / "mask.png", num_classes=4)
    rgb = _decode_rgb_png(path)
    palette = np.round(viz.mask_palette(4) * 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb, palette[mask])
    assert tuple(palette[0]) == (0, 0, 0)              # background black
    assert len({tuple(c) for c in palette}) == 4         # classes distinct
    _no_temporaries(tmp_path / "sub")


def test_mask_palette_is_fixed_and_distinct_for_many_classes():
    first, second = viz.mask_palette(3), viz.mask_palette(20)
    np.testing.assert_array_equal(first, second[:3])
    assert len({tuple(np.round(c, 3)) for c in second}) == 20
    with pytest.raises(ValueError, match="num_classes"):
        viz.mask_palette(0)


def test_save_mask_rejects_bad_masks(tmp_path):
    with pytest.raises(ValueError, match=r"save_mask: mask must be \(H, W\)"):
        viz.save_mask(np.zeros((2, 2, 1), int), tmp_path / "m.png", 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        viz.save_mask(np.array([[0, 2]]), tmp_path / "m.png", 2)
    with pytest.raises(TypeError, match="integer class labels"):
        viz.save_mask(np.array([[0.0, 1.0]]), tmp_path / "m.png", 2)


def test_crop_windows_cover_a_long_strip_evenly():
    windows = viz.crop_windows(64, 512, 64, 4)
    assert len(windows) == 4
    assert all(top == 0 and side == 64 for top, _, side in windows)
    lefts = [left for _, left, _ in windows]
    assert lefts[0] == 0 and lefts[-1] == 512 - 64 and lefts == sorted(set(lefts))
    # a square image smaller than the crop is one window; a grid when both sides are long
    assert viz.crop_windows(50, 50, 64, 4) == [(0, 0, 50)]
    grid = viz.crop_windows(256, 256, 128, 4)
    assert sorted(grid) == [(0, 0, 128), (0, 128, 128), (128, 0, 128), (128, 128, 128)]


def test_error_map_codes():
    truth = np.array([[0, 0, 1, 1, 2]])
    guess = np.array([[0, 1, 0, 1, 1]])
    np.testing.assert_array_equal(viz.error_map(truth, guess), [[0, 1, 2, 0, 3]])


# -- pictures -------------------------------------------------------------------------------------
def test_training_curves(tmp_path):
    pytest.importorskip("matplotlib")
    history = {"loss": [1.2, 0.8, 0.5, 0.4], "val_loss": [1.3, 0.9, 0.7, 0.6],
               "pixel_accuracy": [0.6, 0.7, 0.8, 0.85], "val_dice": [0.3, 0.5, 0.6, 0.65]}
    path = viz.save_training_curves(history, tmp_path / "curves.png")
    picture = _check_png(path, min_colours=4)
    assert picture.shape[1] > picture.shape[0]          # two panels side by side
    _no_temporaries(tmp_path)
    with pytest.raises(ValueError, match="non-empty dict"):
        viz.save_training_curves({}, tmp_path / "empty.png")


def test_predictions_of_a_long_strip_are_cropped(tmp_path, rng):
    pytest.importorskip("matplotlib")
    image = rng.random((1, 64, 512, 1)).astype(np.float32)
    truth = (image[..., 0] > 0.5).astype(np.int64)
    guess = (image[..., 0] > 0.6).astype(np.int64)
    path = viz.save_predictions(image, truth, guess, tmp_path / "predictions.png")
    picture = _check_png(path, min_colours=3)
    # 4 rows of square crops, 4 columns: about square, not a 1:8 strip
    assert 0.7 < picture.shape[0] / picture.shape[1] < 1.4
    _no_temporaries(tmp_path)


def test_predictions_of_small_rgb_images_and_many_classes(tmp_path, rng):
    pytest.importorskip("matplotlib")
    images = rng.random((6, 32, 32, 3))
    truth = rng.integers(0, 11, size=(6, 32, 32))
    guess = rng.integers(0, 11, size=(6, 32, 32))
    path = viz.save_predictions(images, truth, guess, tmp_path / "p.png", max_rows=2)
    picture = _check_png(path, min_colours=11)
    assert picture.shape[1] > picture.shape[0]          # 2 rows of 4 columns


def test_save_predictions_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"save_predictions: expected images \(N, H, W, C\)"):
        viz.save_predictions(np.zeros((2, 8, 8, 1)), np.zeros((2, 8, 7), int),
                             np.zeros((2, 8, 7), int), tmp_path / "p.png")


def test_read_image_round_trip(tmp_path, rng):
    pytest.importorskip("matplotlib")
    mask = rng.integers(0, 3, size=(5, 6))
    viz.save_mask(mask, tmp_path / "mask.png", 3)
    image = viz.read_image(tmp_path / "mask.png")
    assert image.shape == (5, 6, 3)
    np.testing.assert_allclose(image, np.round(viz.mask_palette(3) * 255)[mask] / 255, atol=1e-6)
    np.save(tmp_path / "array.npy", mask.astype(np.float32))
    np.testing.assert_array_equal(viz.read_image(tmp_path / "array.npy"), mask)
    with pytest.raises(FileNotFoundError, match="read_image: no such file"):
        viz.read_image(tmp_path / "missing.png")


def test_overlay_filters_and_feature_map_grid(tmp_path, rng):
    pytest.importorskip("matplotlib")
    image = rng.random((24, 40))
    mask = (image > 0.7).astype(int) + (image > 0.9)
    _check_png(viz.overlay(image, mask, tmp_path / "overlay.png"), min_colours=3)
    _check_png(viz.plot_filters(rng.normal(size=(3, 3, 3, 8)), tmp_path / "rgb.png"), 3)
    _check_png(viz.plot_filters(rng.normal(size=(5, 5, 4, 6)), tmp_path / "pairs.png"), 3)
    _check_png(viz.plot_feature_maps(rng.random((12, 12, 20)), tmp_path / "maps.png"), 3)
    with pytest.raises(ValueError, match=r"plot_filters: kernel must be \(kh, kw, in, out\)"):
        viz.plot_filters(rng.normal(size=(3, 3, 4)), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="overlay: image"):
        viz.overlay(image, mask[:, :5], tmp_path / "bad.png")
    _no_temporaries(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        with open(args[0], "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        viz.save_training_curves({"loss": [1.0, 0.5]}, path)
    assert path.read_bytes() == b"old"
    _no_temporaries(tmp_path)


# -- with layers: feature maps, filters of a layer, gradient flow -----------------------------------
@pytest.fixture
def layers():
    pytest.importorskip("minicnn.layers")
    from minicnn import layers as kl
    if not all(hasattr(kl, name) for name in ("Conv2D", "BatchNormalization", "Dense", "ReLU")):
        pytest.skip("minicnn.layers has no Conv2D / BatchNormalization / Dense / ReLU yet")
    return kl


def test_feature_maps_are_the_layer_output(layers, tmp_path, rng):
    import minicnn as mc
    kl = layers
    mc.seed(3)
    conv, relu = kl.Conv2D(6, 3, padding="same"), kl.ReLU()
    pool = kl.MaxPooling2D(2)
    model = mc.models.Sequential([conv, relu, pool])
    image = rng.random((10, 12, 1)).astype(np.float32)
    expected = relu(conv(image[None])).numpy()[0]
    for which in (1, relu, relu.name):
        maps = viz.feature_maps(model, image, which)
        assert maps.shape == (10, 12, 6)
        np.testing.assert_allclose(maps, expected, rtol=1e-6)
    chain = viz.feature_maps([conv, relu, pool], image[..., 0], 2)
    assert chain.shape == (5, 6, 6)
    assert conv.call.__func__ is type(conv).call        # the recorder put the layer back
    _check_png(viz.plot_feature_maps(maps, tmp_path / "maps.png"), 3)
    _check_png(viz.plot_filters(conv, tmp_path / "filters.png"), 3)
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        viz.feature_maps(model, image, "nope")
    with pytest.raises(ValueError, match="out of range"):
        viz.feature_maps(model, image, 7)


def test_feature_maps_of_a_nested_functional_model(layers, rng):
    import minicnn as mc
    kl = layers
    inputs = kl.Input((8, 8, 3))
    hidden = kl.Conv2D(4, 3, padding="same", name="inner_conv")(inputs)
    outputs = kl.Conv2D(2, 1)(kl.ReLU()(hidden))
    model = mc.Model(inputs, outputs)
    image = rng.random((8, 8, 3)).astype(np.float32)
    maps = viz.feature_maps(model, image, "inner_conv")
    conv = model.layers[0]
    np.testing.assert_allclose(maps, conv(image[None]).numpy()[0], rtol=1e-6)


def test_gradient_flow_lists_layers_in_depth_order(layers, rng):
    import minicnn as mc
    from minicnn.losses import SparseCategoricalCrossentropy
    kl = layers
    mc.seed(0)
    model = mc.models.Sequential([kl.Conv2D(4, 3, name="first"), kl.BatchNormalization(),
                                  kl.ReLU(), kl.Conv2D(4, 3, name="second"),
                                  kl.GlobalAveragePooling2D(), kl.Dense(3, name="head")])
    x = rng.normal(size=(4, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=4)
    model(x, training=False)
    state = [w.numpy() for w in model.non_trainable_weights]
    flow = viz.gradient_flow(model, x, y, SparseCategoricalCrossentropy(from_logits=True))
    assert [name for name, _ in flow] == ["first", "second", "head"]
    assert all(norm > 0 for _, norm in flow)
    # the head's number is the norm of its kernel's gradient, left on the weight
    head = model.stack[-1]
    assert flow[-1][1] == pytest.approx(float(np.linalg.norm(head.kernel.grad)), rel=1e-5)
    for before, weight in zip(state, model.non_trainable_weights):   # BN state put back
        np.testing.assert_array_equal(before, weight.numpy())
    every = viz.gradient_flow(model, x, y, SparseCategoricalCrossentropy(from_logits=True),
                              kernels_only=False)
    assert len(every) == 4                                          # + batch_normalization


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_bridges_carry_the_gradient_to_the_first_layer(layers, tmp_path, seed):
    """The course's point: in a deep net without normalisation the error "takes the bridge".
    With the bridges the stem's gradient is orders of magnitude larger (about 1000x at 6 blocks
    over seeds 0..7; asserted > 100x); without them it shrinks toward the input."""
    path = tmp_path / "flow.png"
    results = viz.compare_gradient_flow(path, depth=6, seed=seed)
    plain = [norm for _, norm in results["plain"]]
    residual = [norm for _, norm in results["residual"]]
    assert len(plain) == len(residual) == 1 + 2 * 6 + 1           # stem, 2 convs per block, head
    assert residual[0] > 100 * plain[0]
    assert max(plain) > 2 * plain[0]                                # vanishing toward the input
    _check_png(path, 3)


def test_batch_norm_alone_keeps_the_plain_gradient_from_vanishing(layers):
    results = viz.compare_gradient_flow(None, depth=6, seed=0, batch_norm=True)
    plain = [norm for _, norm in results["plain"]]
    residual = [norm for _, norm in results["residual"]]
    assert plain[0] > 0.5 * max(plain)
    assert 0.2 < residual[0] / plain[0] < 5


def test_instance_overlay_colours_matches_and_marks_errors(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    truth = np.zeros((40, 100), dtype=np.int64)
    truth[5:15, 5:15], truth[20:30, 40:50], truth[5:12, 70:80] = 1, 2, 3
    found = np.zeros_like(truth)
    found[5:15, 5:14] = 7                       # matches nucleus 1
    found[22:26, 80:90] = 9                     # a false detection; nuclei 2 and 3 are missed
    path = viz.save_instance_overlay(np.zeros((40, 100, 1)), truth, found, tmp_path / "o.png",
                                     pairs=[(1, 7)], missed=[2, 3], false=[9], bands=[(0, 20), (20, 40)],
                                     band_labels=["a", "b"], title="t")
    picture = mpimg.imread(path)
    assert picture.shape[1] > picture.shape[0] and picture.shape[0] > 200
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())     # written atomically
    red = (picture[..., 0] > 0.6) & (picture[..., 1] < 0.3) & (picture[..., 2] < 0.3)
    yellow = (picture[..., 0] > 0.8) & (picture[..., 1] > 0.8) & (picture[..., 2] < 0.4)
    assert red.sum() > 20 and yellow.sum() > 20             # the false detection and the misses
    with pytest.raises(ValueError, match=r"save_instance_overlay.*\(40, 100\).*\(40, 99\)"):
        viz.save_instance_overlay(np.zeros((40, 100)), truth, found[:, :99], tmp_path / "x.png")
