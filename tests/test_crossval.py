"""minicnn train --task instances (minicnn.crossval): folds, the printed line, the files, the picture."""
import argparse
import re

import numpy as np
import pytest

from minicnn import cli, crossval, data, io, segmentation as seg

TINY = ["train", "--task", "instances", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
        "--crop", "32", "--base-filters", "2", "--depth", "2", "--device", "cpu", "--flips", "2",
        "--no-tune"]


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory):
    out = tmp_path_factory.mktemp("instances")
    import contextlib
    import io as text_io
    printed = text_io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(TINY + ["--folds", "2", "--out", str(out)])
    assert code == 0
    return out, printed.getvalue()


def test_two_folds_print_one_row_each_and_the_cross_validated_line_last(two_folds):
    out, printed = two_folds
    lines = printed.strip().splitlines()
    assert re.fullmatch(r"cross-validated instance F1@0\.5 \d\.\d{4} mean AP \d\.\d{4} over 125 nuclei",
                        lines[-1]), lines[-1]
    assert sum(line.startswith("fold ") for line in lines) == 2
    assert any(line.startswith("fold 1: test rows 256-511") for line in lines)


def test_two_folds_write_the_table_the_maps_and_the_picture(two_folds):
    out, printed = two_folds
    rows = (out / "folds.csv").read_text().strip().splitlines()
    assert rows[0].split(",") == list(crossval.CSV_COLUMNS)
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "all"]
    nuclei = [int(r.split(",")[3]) for r in rows[1:]]
    assert nuclei[0] + nuclei[1] == nuclei[2] == 125
    tp, fp, fn = (int(v) for v in rows[-1].split(",")[4:7])
    assert tp + fn == 125
    arrays, manifest = io.read_npz(out / "instances.npz")
    assert arrays["predicted"].shape == (512, 512) and manifest["bands"] == [[0, 256], [256, 512]]
    assert len(arrays["pairs"]) == tp and len(arrays["missed"]) == fn and len(arrays["false"]) == fp
    for k in range(2):
        assert (out / f"fold{k}.npz").exists()
    pytest.importorskip("matplotlib")
    assert (out / "instances.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["train", "--folds", "2"], "--folds needs --task instances"),
    (["train", "--task", "instances", "--head", "mask", "--postprocess", "watershed"],
     "--postprocess watershed needs --head border or distance"),
    (["train", "--task", "instances", "--dataset", "shapes"], "works on the nuclei image"),
    (["train", "--task", "instances", "--folds", "0"], "--folds must be >= 1"),
])
def test_bad_instance_arguments_exit_2_with_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def recipe(**changes):
    args = argparse.Namespace(head="border", postprocess="watershed", border_weight=10.0,
                              border_sigma=5.0)
    vars(args).update(changes)
    return args


def test_targets_hold_classes_weights_and_distance():
    labels = data.nuclei_instances("all")[:64]
    border = crossval.targets(labels, recipe())
    assert border.shape == (64, 512, 2)
    np.testing.assert_array_equal(border[..., 0], seg.classes_from_instances(labels))
    assert border[..., 1].min() >= 1.0 and border[..., 1].max() > 5.0    # w_c = 1 plus the gap term
    plain = crossval.targets(labels, recipe(head="mask", border_weight=0.0))
    np.testing.assert_array_equal(plain[..., 0], labels > 0)
    assert (plain[..., 1] == 1.0).all()
    distance = crossval.targets(labels, recipe(head="distance"))
    assert distance.shape == (64, 512, 3)
    np.testing.assert_allclose(distance[..., 2], seg.distance_target(labels), atol=1e-6)


def test_tune_chooses_on_the_band_it_is_given():
    labels = data.nuclei_instances("all")
    rows = (384, 448)
    truth = labels[384:448]
    # "probabilities" of a perfect distance head: p(nucleus) and the true normalised distance
    fg = (truth > 0).astype(np.float32)
    probs = np.stack([1 - fg, fg, seg.distance_target(labels)[384:448].astype(np.float32)], axis=-1)
    params = crossval.tune(probs, labels, rows, recipe(head="distance"))
    found = crossval.segment(probs, "distance", "watershed", **params)
    f1, ap = seg.scores_from_counts(crossval.band_counts(labels, rows, found))
    assert f1 > 0.95 and ap > 0.9
    # a fake foreground at 0.45 everywhere else: only a threshold above it keeps the nuclei apart
    probs[..., 1] = np.where(fg > 0, 1.0, 0.45)
    probs[..., 0] = 1 - probs[..., 1]
    assert crossval.tune(probs, labels, rows, recipe(head="distance"))["fg_threshold"] >= 0.5


def test_distance_head_loss_is_cross_entropy_plus_squared_error():
    from minicnn import losses
    from minicnn.tensor import Tensor
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, 3))
    y = np.stack([rng.integers(0, 2, (2, 4, 5)), rng.random((2, 4, 5))], axis=-1)
    weight = rng.random((2, 4, 5)) + 0.5
    got = crossval.DistanceHeadLoss(2, distance_weight=2.0)(y, Tensor(logits), sample_weight=weight)
    ce = losses.SparseCategoricalCrossentropy(from_logits=True)(y[..., 0], logits[..., :2],
                                                                 sample_weight=weight)
    sigmoid = 1 / (1 + np.exp(-logits[..., 2]))
    expected = float(ce.data) + 2.0 * np.mean((sigmoid - y[..., 1]) ** 2)
    assert float(got.data) == pytest.approx(expected, rel=1e-10)
