"""Models: Model / Sequential / functional graphs, the U-Net, residual and separable blocks."""
from minicnn.io import load_model  # noqa: F401
from minicnn.models.blocks import ResidualBlock, SeparableBlock, SmallCNN  # noqa: F401
from minicnn.models.model import Model, Sequential  # noqa: F401
from minicnn.models.unet import ConvBlock, CropToMatch, UNet  # noqa: F401
