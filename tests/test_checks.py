"""`minicnn gradcheck`: every built-in function is checked, listed, and a broken backward fails."""
import inspect

import numpy as np
import pytest

import minicnn as mc
from helpers import Cube
from minicnn import checks


@pytest.fixture(scope="module")
def table():
    """(failures, printed lines) of one full run, shared by the tests that only read it."""
    lines = []
    failures = checks.run_all_gradchecks(print_fn=lines.append)
    return failures, lines


def _row(lines, name):
    rows = [line for line in lines if line.strip().startswith(name + " ")]
    assert rows, f"no row for {name!r} in the table"
    return rows[0]


def test_every_builtin_passes(table):
    failures, lines = table
    assert failures == 0, "\n".join(lines)
    assert lines[-1].split()[0] == lines[-1].split()[2]          # "N of N passed"
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) >= 60
    assert all(line.rstrip().endswith("pass") for line in rows)


@pytest.mark.parametrize("name", [
    "conv2d valid", "conv2d strides=2 padding=same", "conv2d dilation=2 padding=same",
    "conv2d_transpose strides=2", "depthwise_conv2d multiplier=2", "pad2d", "crop2d",
    "max_pool2d 2x2", "avg_pool2d 3x3 strides=2 same", "global_avg_pool2d",
    "upsample2d nearest 2x3", "upsample2d bilinear 2x2", "batch_norm training",
    "batch_norm inference", "batch_norm_relu training", "relu", "leaky_relu", "sigmoid", "tanh",
    "softmax axis=-1",
    "log_softmax", "matmul (batched)", "dense (x @ W + b)", "exp", "log", "sqrt",
])
def test_table_lists_the_function(table, name):
    _, lines = table
    row = _row(lines, name)
    _, relative, absolute, verdict = row.rsplit(None, 3)
    assert verdict == "pass"
    relative = float(relative)
    assert 0.0 <= relative < 1e-5


def test_table_lists_every_loss_class(table):
    from minicnn import losses
    _, lines = table
    names = [name for name, cls in inspect.getmembers(losses, inspect.isclass)
             if issubclass(cls, losses.Loss) and cls is not losses.Loss
             and not name.startswith("_") and cls.__module__ == losses.__name__]
    assert {"SparseCategoricalCrossentropy", "Dice", "CEDice"} <= set(names)
    for name in names:
        assert any(line.strip().startswith(name) for line in lines), name


def test_a_broken_backward_fails(monkeypatch):
    from minicnn.functions import activations
    original = activations.Sigmoid.backward
    monkeypatch.setattr(activations.Sigmoid, "backward", lambda self, g: -original(self, g))
    lines = []
    failures = checks.run_all_gradchecks(print_fn=lines.append)
    assert failures >= 1
    assert "FAIL" in _row(lines, "sigmoid")
    assert f"{failures} failed" in lines[-1]


def test_a_broken_convolution_filter_gradient_fails(monkeypatch):
    from minicnn.functions import conv
    broken = [cls for _, cls in inspect.getmembers(conv, inspect.isclass)
              if issubclass(cls, mc.Function) and cls.__module__ == conv.__name__
              and "conv2d" in cls.__name__.lower().replace("_", "")
              and "transpose" not in cls.__name__.lower() and "depthwise" not in cls.__name__.lower()]
    assert broken, "no Conv2D Function class found in minicnn.functions.conv"
    for cls in broken:
        original = cls.backward

        def halved(self, g, original=original):
            grads = list(original(self, g))
            grads[1] = None if grads[1] is None else grads[1] * 0.5
            return tuple(grads)
        monkeypatch.setattr(cls, "backward", halved)
    lines = []
    assert checks.run_all_gradchecks(print_fn=lines.append) >= 1
    row = _row(lines, "conv2d valid")
    assert "FAIL (worst: kernel)" in row


def test_a_module_that_cannot_be_imported_is_a_failed_row(monkeypatch):
    def missing():
        raise ImportError("no module named minicnn.functions.nothing")
    monkeypatch.setattr(checks, "GROUPS", [("minicnn.functions.nothing", missing),
                                           ("minicnn.functions.math", checks._math_checks)])
    lines = []
    assert checks.run_all_gradchecks(print_fn=lines.append) == 1
    assert any("ERROR ImportError" in line for line in lines)


def test_a_check_that_raises_is_a_failed_row(monkeypatch):
    def bad(rs):
        raise ValueError("shapes do not fit")
    monkeypatch.setattr(checks, "GROUPS", [("demo", lambda: [checks.Check("bad one", bad)])])
    lines = []
    assert checks.run_all_gradchecks(print_fn=lines.append) == 1
    assert "ERROR ValueError: shapes do not fit" in _row(lines, "bad one")


@pytest.mark.parametrize("factor", [3.0, 2.9, -3.0, 0.0, 3.003])
def test_gradient_errors_agree_with_gradcheck(rng, factor):
    """passed is exactly gradcheck's verdict; a factor f instead of 3 gives |f - 3| / 3."""
    x = rng.normal(size=(3, 4)) + 2
    errors = checks.gradient_errors(lambda t: Cube(factor)(t), x)
    try:
        verdict = mc.gradcheck(lambda t: Cube(factor)(t), x)
    except mc.GradcheckError:
        verdict = False
    assert errors.passed == verdict
    assert errors.relative == pytest.approx(abs(factor - 3.0) / 3.0, abs=1e-7)
    assert errors.worst_input == "input 0"


def test_gradient_errors_on_large_inputs_use_directions(rng):
    x = rng.normal(size=(30, 30)) + 2
    assert checks.gradient_errors(lambda t: Cube()(t), x, max_elements=100).passed
    wrong = checks.gradient_errors(lambda t: Cube(2.7)(t), x, max_elements=100)
    assert not wrong.passed
    assert wrong.relative == pytest.approx(0.1, rel=1e-6)


def test_gradient_errors_treat_integer_inputs_as_constants(rng):
    labels = np.array([0, 2, 1])
    errors = checks.gradient_errors(lambda p, y: p[np.arange(3), y.data].sum(),
                                    rng.normal(size=(3, 3)), labels, names=["p", "labels"])
    assert errors.passed and errors.worst_input == "p"


def test_gradient_errors_needs_a_tensor_back(rng):
    with pytest.raises(TypeError, match="must return a Tensor"):
        checks.gradient_errors(lambda t: 1.0, rng.normal(size=3))
