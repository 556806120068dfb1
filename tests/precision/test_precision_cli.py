"""``minicnn train --precision``: the four settings, their policy, and a bad value."""
import json
import subprocess
import sys

import pytest

from minicnn import cli
from minicnn import mixed_precision as mp


@pytest.fixture(autouse=True)
def float32_afterwards():
    yield
    mp.set_precision("float32")


def test_precision_choices_and_default():
    parser = cli.make_parser()
    assert parser.parse_args(["train"]).precision == "float32"
    for name in ("float32", "tf32", "bf16", "fp16"):
        assert parser.parse_args(["train", "--precision", name]).precision == name
    done = subprocess.run([sys.executable, "-m", "minicnn.cli", "train", "--precision", "fp8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'fp8'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("precision, policy", [("bf16", "mixed_bfloat16"),
                                               ("fp16", "mixed_float16")])
def test_train_runs_under_the_policy(tmp_path, capsys, precision, policy):
    pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes (in the test extra)")
    code = cli.main(["train", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
                     "--crop", "32", "--base-filters", "2", "--depth", "1", "--device", "cpu",
                     "--precision", precision, "--out", str(tmp_path)])
    assert code == 0
    assert f"precision {precision}" in capsys.readouterr().out
    assert mp.global_policy().name == policy
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["test_dice"] <= 1.0
