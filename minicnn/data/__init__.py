"""Data for segmentation: two real data sets shipped with the package, synthetic shapes, random
crops and tiling, and joint image + mask augmentation. Provenance: minicnn/data/README.md.

    nuclei(classes=2|3, split="train"|"val"|"test")  -> (image (H, W, 1) float32, mask (H, W) int64)
    nuclei_instances(split)                          -> instance map (H, W) int64
    m2nist(n_images, canvas=(64, 64), split=...)     -> (images (N, H, W, 1), masks (N, H, W)), classes 0..10
    shapes(n_images, size=64, seed=0)                -> (images (N, S, S, 1), masks (N, S, S)), classes 0..3
    random_crops(image, mask, crop, batch_size, seed, rows=None), tile(image, crop), untile(crops, corners, shape)
    band_folds(height, folds, val_rows=64)           -> k-fold BandFolds (test / val / train rows) of one image
    objects_in_band(labels, rows)                    -> (scored ids, ignored ids) of a band
    ImageDataGenerator(rotation_range=..., elastic_sigma=...).flow(images, masks, batch_size, seed)
"""
from minicnn.data.augmentation import ImageDataGenerator
from minicnn.data.datasets import (NUCLEI_SPLITS, SegmentationData, m2nist, mnist_digits, nuclei,
                                   nuclei_instances)
from minicnn.data.folds import BandFold, band_folds, objects_in_band
from minicnn.data.sampling import random_crops, tile, untile
from minicnn.data.synthetic import shapes

__all__ = ["BandFold", "ImageDataGenerator", "NUCLEI_SPLITS", "SegmentationData", "band_folds", "m2nist",
           "mnist_digits", "nuclei", "nuclei_instances", "objects_in_band", "random_crops", "shapes", "tile",
           "untile"]
