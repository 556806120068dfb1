"""minicnn.data.band_folds / objects_in_band, and crops that stay inside a fold's training rows."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minicnn.data import NUCLEI_SPLITS, band_folds, nuclei_instances, objects_in_band, random_crops


def rows_of(ranges):
    return set().union(*(range(a, b) for a, b in ranges)) if ranges else set()


@given(height=st.integers(40, 600), folds=st.integers(1, 6), val_rows=st.integers(1, 64))
def test_folds_are_disjoint_and_the_test_bands_cover_the_image_once(height, folds, val_rows):
    try:
        splits = band_folds(height, folds, val_rows)
    except ValueError:
        # only when some test band leaves no training rows, or no room for the validation band
        edges = ([height - val_rows, height] if folds == 1
                 else [k * height // folds for k in range(folds + 1)])
        bands = list(zip(edges[:-1], edges[1:]))
        assert any(b - a + val_rows >= height or (a < val_rows and b + val_rows > height)
                   for a, b in bands)
        return
    assert len(splits) == folds
    if folds > 1:
        tested = [r for f in splits for r in range(*f.test)]
        assert sorted(tested) == list(range(height))                  # every row tested exactly once
    for fold in splits:
        test, val, train = rows_of([fold.test]), rows_of([fold.val]), rows_of(fold.train)
        assert len(val) == val_rows and test and train
        assert not (test & val) and not (test & train) and not (val & train)
        assert test | val | train == set(range(height))
        assert fold.val[1] == fold.test[0] or (fold.test[0] < val_rows and fold.val[0] == fold.test[1])


def test_four_folds_of_the_nuclei_image():
    splits = band_folds(512, 4)
    assert [f.test for f in splits] == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert [f.val for f in splits] == [(128, 192), (64, 128), (192, 256), (320, 384)]
    assert [f.train for f in splits] == [((192, 512),), ((0, 64), (256, 512)), ((0, 192), (384, 512)),
                                         ((0, 320),)]


def test_one_fold_is_the_fixed_split():
    (fold,) = band_folds(512, 1)
    assert fold.test == NUCLEI_SPLITS["test"] and fold.val == NUCLEI_SPLITS["val"]
    assert fold.train == (NUCLEI_SPLITS["train"],)


def test_band_folds_bad_input():
    with pytest.raises(ValueError, match="band_folds: need folds >= 1"):
        band_folds(512, 0)
    with pytest.raises(ValueError, match="band_folds: 100 rows cannot hold"):
        band_folds(100, 2, val_rows=50)


@pytest.mark.parametrize("fold", band_folds(512, 4))
def test_crops_never_reach_into_the_test_or_validation_band(fold):
    # pixel value = its row, so every crop says which rows it came from
    image = np.repeat(np.arange(512, dtype=np.float32)[:, None], 96, axis=1)[..., None]
    mask = np.zeros((512, 96), dtype=np.int64)
    stream = random_crops(image, mask, 64, 16, seed=fold.index, rows=fold.train)
    seen = set()
    for _ in range(30):
        x, _ = next(stream)
        for crop in x[..., 0]:
            top, bottom = int(crop[0, 0]), int(crop[-1, 0])
            assert any(a <= top and bottom < b for a, b in fold.train)
            seen.add(top)
    held_out = rows_of([fold.test, fold.val])
    assert not any(rows_of([(t, t + 64)]) & held_out for t in seen)
    if len(fold.train) == 2:                                           # both training parts are used
        assert all(any(a <= t < b for t in seen) for a, b in fold.train)


def test_crops_with_target_maps_and_bad_rows():
    image = np.zeros((20, 30, 1), dtype=np.float32)
    maps = np.stack([np.zeros((20, 30)), np.ones((20, 30))], axis=-1)
    x, y = next(random_crops(image, maps, 8, 3, seed=0, rows=[(0, 10)]))
    assert x.shape == (3, 8, 8, 1) and y.shape == (3, 8, 8, 2) and (y[..., 1] == 1).all()
    with pytest.raises(ValueError, match=r"random_crops: rows must be .* crop of 8 rows"):
        next(random_crops(image, maps, 8, 3, rows=[(0, 5)]))
    with pytest.raises(ValueError, match="random_crops: rows"):
        next(random_crops(image, maps, 8, 3, rows=[(15, 40)]))


def test_objects_in_band_by_hand():
    labels = np.zeros((8, 6), dtype=np.int64)
    labels[0:3, 0:2] = 1          # rows 0-2: all in the band [0, 4)
    labels[3:6, 2:4] = 2          # rows 3-5: 2 of 6 px in [0, 4) -> the lower band's
    labels[2:6, 4:6] = 3          # rows 2-5: 4 of 8 px in each: a tie, the upper band takes it
    labels[6:8, 0:3] = 4          # rows 6-7: not in [0, 4) at all
    scored, ignored = objects_in_band(labels, (0, 4))
    assert scored.tolist() == [1, 3] and ignored.tolist() == [2]
    scored, ignored = objects_in_band(labels, (4, 8))
    assert scored.tolist() == [2, 4] and ignored.tolist() == [3]
    with pytest.raises(ValueError, match=r"objects_in_band: rows must be"):
        objects_in_band(labels, (4, 9))


def test_every_nucleus_is_scored_in_exactly_one_of_the_four_bands():
    labels = nuclei_instances("all")
    scored = [objects_in_band(labels, fold.test)[0] for fold in band_folds(512, 4)]
    everyone = np.concatenate(scored)
    assert len(everyone) == len(set(everyone.tolist())) == 125
    assert set(everyone.tolist()) == set(np.unique(labels[labels > 0]).tolist())
