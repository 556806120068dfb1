"""gradcheck passes right backwards and catches wrong ones."""
import numpy as np
import pytest

import minicnn as mc
from helpers import Cube


def test_passes_a_right_backward(rng):
    assert mc.gradcheck(lambda t: Cube()(t), rng.normal(size=(3, 4)))


@pytest.mark.parametrize("factor", [-3.0, 2.9, 0.0])
def test_raises_on_a_wrong_backward(rng, factor):
    with pytest.raises(mc.GradcheckError, match=r"input 0: worst element .* analytic .* numeric"):
        mc.gradcheck(lambda t: Cube(factor)(t), rng.normal(size=(3, 4)) + 2)


def test_large_inputs_use_random_directions(rng):
    x = rng.normal(size=(30, 30)) + 2
    assert mc.gradcheck(lambda t: Cube()(t), x, max_elements=100)
    with pytest.raises(mc.GradcheckError, match="direction"):
        mc.gradcheck(lambda t: Cube(2.9)(t), x, max_elements=100)


def test_names_the_input_and_skips_integer_inputs(rng):
    labels = np.array([0, 2, 1])
    def picked(x, idx):
        return Cube(2.0)(x)[np.arange(3), idx.data]
    with pytest.raises(mc.GradcheckError, match="logits"):
        mc.gradcheck(picked, rng.normal(size=(3, 3)) + 2, labels, names=["logits", "labels"])


def test_seed_repeats_the_package_generator():
    from minicnn.rng import generator
    mc.seed(7)
    first = generator().normal(size=5)
    mc.seed(7)
    np.testing.assert_array_equal(first, generator().normal(size=5))
