"""Residual and separable blocks, and a small CNN classifier built from them.

ResidualBlock (He et al. 2016): y = relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), the
shortcut being x itself, or a 1x1 convolution + BN when the shape changes (the "bridge" the
error takes back to the first layers). SeparableBlock (MobileNet, Howard et al. 2017):
DepthwiseConv2D 3x3 -> BN -> ReLU -> Conv2D 1x1 -> BN -> ReLU.
"""
from __future__ import annotations

from minicnn import layers as kl
from minicnn.layers.base import Layer
from minicnn.layers.normalization import batch_norm_relu
from minicnn.models.model import Model


class ResidualBlock(Layer):
    """x (N, H, W, C) -> (N, ceil(H/s), ceil(W/s), filters); identity shortcut when the
    shapes agree, else a 1x1 projection (Conv2D + BatchNormalization).
    ``shortcut=False`` removes the bridge (a plain conv-BN-ReLU-conv-BN-ReLU block)."""

    input_ndim = 4

    def __init__(self, filters, kernel_size=3, strides=1, shortcut=True, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.shortcut = shortcut
        self.conv1 = kl.Conv2D(filters, kernel_size, strides=strides, padding="same")
        self.bn1 = kl.BatchNormalization()
        self.relu1 = kl.ReLU()
        self.conv2 = kl.Conv2D(filters, kernel_size, padding="same")
        self.bn2 = kl.BatchNormalization()
        self.add = kl.Add()
        self.relu2 = kl.ReLU()
        self.projection = None

    def build(self, input_shape):
        if self.shortcut and (input_shape[-1] != self.filters or self.strides != 1):
            self.projection = kl.Conv2D(self.filters, 1, strides=self.strides)
            self.projection_bn = kl.BatchNormalization()

    def call(self, x, training=False):
        h = batch_norm_relu(self.bn1, self.relu1, self.conv1(x), training)
        h = self.bn2(self.conv2(h), training=training)
        if not self.shortcut:
            return self.relu2(h)
        shortcut = x
        if self.projection is not None:
            shortcut = self.projection_bn(self.projection(x), training=training)
        return self.relu2(self.add([h, shortcut]))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides, "shortcut": self.shortcut}


class SeparableBlock(Layer):
    """MobileNet unit: DepthwiseConv2D 3x3 (stride s) -> BN -> ReLU -> Conv2D 1x1 -> BN -> ReLU."""

    input_ndim = 4

    def __init__(self, filters, strides=1, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.filters, self.strides = filters, strides
        self.depthwise = kl.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)
        self.bn1 = kl.BatchNormalization()
        self.relu1 = kl.ReLU()
        self.pointwise = kl.Conv2D(filters, 1, use_bias=False)
        self.bn2 = kl.BatchNormalization()
        self.relu2 = kl.ReLU()

    def call(self, x, training=False):
        x = batch_norm_relu(self.bn1, self.relu1, self.depthwise(x), training)
        return batch_norm_relu(self.bn2, self.relu2, self.pointwise(x), training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


class SmallCNN(Model):
    """A small image classifier: a 3x3 stem, ``blocks`` residual (or separable, or plain) stages
    that halve the size and double the width, global average pooling, a Dense head.

    kind: "residual" (ResidualBlock), "separable" (SeparableBlock) or "plain" (the same
    residual blocks without their bridges), for comparing gradient flow.
    x (N, H, W, C) -> logits (N, num_classes).
    """

    input_ndim = 4

    def __init__(self, num_classes, filters=16, blocks=3, kind="residual", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if kind not in ("residual", "separable", "plain"):
            raise ValueError(f"SmallCNN: kind must be 'residual', 'separable' or 'plain', got {kind!r}")
        self.num_classes, self.filters, self.blocks, self.kind = num_classes, filters, blocks, kind
        self.stem = kl.Conv2D(filters, 3, padding="same")
        self.stem_bn = kl.BatchNormalization()
        self.stem_relu = kl.ReLU()
        stages = []
        for i in range(blocks):
            width, strides = filters * 2 ** i, 1 if i == 0 else 2
            if kind == "separable":
                stages.append(SeparableBlock(width, strides=strides))
            else:
                stages.append(ResidualBlock(width, strides=strides, shortcut=kind == "residual"))
        self.stages = stages
        self.pool = kl.GlobalAveragePooling2D()
        self.head = kl.Dense(num_classes)

    def call(self, x, training=False):
        x = self.stem_relu(self.stem_bn(self.stem(x), training=training))
        for stage in self.stages:
            x = stage(x, training=training)
        return self.head(self.pool(x))

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes, "filters": self.filters,
                "blocks": self.blocks, "kind": self.kind}
