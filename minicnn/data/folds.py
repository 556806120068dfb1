"""K-fold cross-validation over disjoint bands of rows of one image, and which objects a band scores.

One large image (the nuclei image, 512 rows) is cut by rows into ``folds`` test bands that cover it
once. Fold k tests on band k, picks its checkpoint and post-processing thresholds on a validation
band of ``val_rows`` rows just above the test band (just below it when there is no room above),
and trains on the rest. Crops for training are drawn inside the training
row ranges only (``random_crops(..., rows=fold.train)``), so no crop reaches into the validation or
test band.

An object cut by a band edge is scored once, in the band holding most of its pixels
(``objects_in_band``), on the band's crop of the label map; in the other band it is ignored (see
``minicnn.segmentation.instance_counts(ignore=...)``). Over the folds every object is then counted
exactly once, when no object is taller than a band.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kernels.backend import to_numpy


class BandFold(NamedTuple):
    """Rows [start, stop) of one fold: ``test`` and ``val`` bands, ``train`` row ranges (1 or 2)."""
    index: int
    test: tuple
    val: tuple
    train: tuple


def _complement(height: int, taken) -> tuple:
    """The row ranges of 0..height not covered by the (start, stop) ranges ``taken``."""
    free, row = [], 0
    for start, stop in sorted(taken):
        if start > row:
            free.append((row, start))
        row = max(row, stop)
    if row < height:
        free.append((row, height))
    return tuple(free)


def band_folds(height: int, folds: int, val_rows: int = 64, test_rows: int | None = None) -> list:
    """The ``folds`` BandFolds of an image ``height`` rows high.

    folds >= 2: test bands [k H / folds, (k + 1) H / folds) (integer division), k = 0..folds-1,
    disjoint and covering every row once. folds = 1: one test band, the last ``test_rows``
    (default ``val_rows``) rows. Each fold's validation band is the ``val_rows`` rows just above its
    test band (just below when fewer than ``val_rows`` rows lie above), its training rows everything
    else (one or two row ranges). For the nuclei image,
    ``band_folds(512, 1)`` is the fixed split of ``nuclei(split=...)``: train 0..383, val 384..447,
    test 448..511.
    """
    height, folds, val_rows = int(height), int(folds), int(val_rows)
    if folds < 1 or val_rows < 1:
        raise ValueError(f"band_folds: need folds >= 1 and val_rows >= 1, got folds={folds}, "
                         f"val_rows={val_rows}")
    if folds == 1:
        size = val_rows if test_rows is None else int(test_rows)
        tests = [(height - size, height)]
    else:
        if test_rows is not None:
            raise ValueError("band_folds: test_rows is for folds=1; with folds >= 2 the test bands "
                             "are height / folds rows")
        edges = [k * height // folds for k in range(folds + 1)]
        tests = list(zip(edges[:-1], edges[1:]))
    out = []
    for index, (start, stop) in enumerate(tests):
        fits = start >= val_rows or stop + val_rows <= height
        if stop - start < 1 or (stop - start) + val_rows >= height or not fits:
            raise ValueError(f"band_folds: {height} rows cannot hold a test band of rows "
                             f"{start}..{stop - 1}, a validation band of {val_rows} rows next to it "
                             f"and training rows (folds={folds})")
        val = (start - val_rows, start) if start >= val_rows else (stop, stop + val_rows)
        train = _complement(height, [(start, stop), val])
        out.append(BandFold(index, (start, stop), val, train))
    return out


def objects_in_band(labels, rows):
    """(scored ids, ignored ids): the objects of an instance map (H, W) (whole-image ids) with pixels
    in the band of rows [start, stop), split by where most of their pixels lie.

    An object is scored in the band when more than half of its pixels are inside it, or exactly half
    and the band holds its top row (the upper of two bands takes a tie); otherwise it is ignored
    there. Both are sorted int64 arrays. For bands that cover the image once, each object is scored
    in exactly one band as long as it spans at most two of them.
    """
    labels = to_numpy(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"objects_in_band: labels must be an (H, W) integer instance map, got "
                         f"shape {labels.shape} and dtype {labels.dtype}")
    start, stop = int(rows[0]), int(rows[1])
    if not 0 <= start < stop <= labels.shape[0]:
        raise ValueError(f"objects_in_band: rows must be (start, stop) with 0 <= start < stop <= "
                         f"{labels.shape[0]}, got {tuple(rows)}")
    labels = labels.astype(np.int64)
    size = int(labels.max()) + 1
    total = np.bincount(labels.ravel(), minlength=size)
    inside = np.bincount(labels[start:stop].ravel(), minlength=size)
    row_of = np.broadcast_to(np.arange(labels.shape[0])[:, None], labels.shape)
    top = np.full(size, labels.shape[0])
    np.minimum.at(top, labels.ravel(), row_of.ravel())
    present = inside > 0
    present[0] = False
    scored = present & ((2 * inside > total) | ((2 * inside == total) & (top >= start)))
    ids = np.arange(size)
    return ids[scored], ids[present & ~scored]
