"""Data for segmentation: two real data sets shipped with the package, synthetic shapes, random
crops and tiling, and joint image + mask augmentation. Provenance: minicnn/data/README.md.

    nuclei(classes=2|3, split="train"|"val"|"test")  -> (image (H, W, 1) float32, mask (H, W) int64)
    nuclei_instances(split)                          -> instance map (H, W) int64
    m2nist(n_images, canvas=(64, 64), split=...)     -> (images (N, H, W, 1), masks (N, H, W)), classes 0..10
    shapes(n_images, size=64, seed=0)                -> (images (N, S, S, 1), masks (N, S, S)), classes 0..3
    random_crops(image, mask, crop, batch_size, seed), tile(image, crop), untile(crops, corners, shape)
    ImageDataGenerator(rotation_range=..., elastic_sigma=...).flow(images, masks, batch_size, seed)
"""
from minicnn.data.augmentation import ImageDataGenerator
from minicnn.data.datasets import (NUCLEI_SPLITS, SegmentationData, m2nist, mnist_digits, nuclei,
                                   nuclei_instances)
from minicnn.data.sampling import random_crops, tile, untile
from minicnn.data.synthetic import shapes

__all__ = ["ImageDataGenerator", "NUCLEI_SPLITS", "SegmentationData", "m2nist", "mnist_digits", "nuclei",
           "nuclei_instances", "random_crops", "shapes", "tile", "untile"]
