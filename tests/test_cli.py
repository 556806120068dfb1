"""The minicnn command end to end on tiny settings; bad arguments exit 2 with one line."""
import json
import subprocess
import sys

import numpy as np
import pytest

from minicnn import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minicnn.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.main(["train", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2",
                     "--crop", "32", "--base-filters", "2", "--depth", "2", "--device", "cpu",
                     "--out", str(out)])
    assert code == 0
    return out


def test_train_writes_every_promised_file(trained):
    for name in ("model.npz", "last.npz", "history.csv", "history.json", "results.json"):
        assert (trained / name).exists(), name
    history = json.loads((trained / "history.json").read_text())
    assert len(history["loss"]) == 2 and "val_dice" in history
    results = json.loads((trained / "results.json").read_text())
    assert 0.0 <= results["test_dice"] <= 1.0
    assert "instance_f1@0.5" in results
    pytest.importorskip("matplotlib")
    assert (trained / "curves.png").stat().st_size > 0
    assert (trained / "predictions.png").stat().st_size > 0


def test_resume_continues_from_last_checkpoint(trained, capsys):
    code = cli.main(["train", "--epochs", "3", "--steps-per-epoch", "2", "--batch-size", "2",
                     "--crop", "32", "--base-filters", "2", "--depth", "2", "--device", "cpu",
                     "--out", str(trained), "--resume"])
    assert code == 0
    assert "after epoch 2" in capsys.readouterr().out
    assert len(json.loads((trained / "history.json").read_text())["loss"]) == 3


def test_evaluate_and_predict(trained, tmp_path, capsys):
    assert cli.main(["evaluate", "--weights", str(trained / "model.npz")]) == 0
    assert "test Dice" in capsys.readouterr().out
    image = np.random.default_rng(0).random((40, 52)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    assert cli.main(["predict", str(tmp_path / "image.npy"), "--weights",
                     str(trained / "model.npz"), "--out", str(tmp_path / "mask.npy")]) == 0
    mask = np.load(tmp_path / "mask.npy")
    assert mask.shape == (40, 52) and set(np.unique(mask)) <= {0, 1}


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--crop", "30", "--depth", "3"], "--crop 30"),
    (["train", "--classes", "5"], "--classes must be 2 or 3"),
    (["evaluate", "--weights", "no/such/file.npz"], "no such file"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_weights_of_another_architecture(trained, tmp_path):
    from minicnn.models import UNet
    other = UNet(3, base_filters=2, depth=2)
    other.build((None, 32, 32, 1))
    other.save(tmp_path / "three.npz")
    result = run_cli("evaluate", "--weights", str(tmp_path / "three.npz"))
    assert result.returncode == 2
    assert "3 classes" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_train_writes_tensorboard_logs(tmp_path):
    pytest.importorskip("tensorboardX", reason="--tensorboard needs the optional tensorboardX")
    code = cli.main(["train", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
                     "--crop", "32", "--base-filters", "2", "--depth", "2", "--device", "cpu",
                     "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert code == 0
    for run in ("train", "validation"):
        events = list((tmp_path / "tb" / run).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0, run
    text = (tmp_path / "tb" / "validation").glob("events.out.tfevents.*").__next__().read_bytes()
    assert b"epoch_dice" in text and b"predictions/0" in text
