"""Draw the README's teaching pictures from a trained nuclei model.

    minicnn train --out runs/minicnn && python docs/figures.py runs/minicnn/model.npz docs/
"""
import sys

import minicnn as mc
from minicnn import data, visualize
from minicnn.models import load_model


def main(weights, folder):
    model = load_model(weights)
    image = data.nuclei(2, "test").image[:, 256:320]          # one 64 x 64 test crop
    first_conv = model.encoder[0].conv1
    visualize.plot_filters(first_conv, f"{folder}/filters.png")
    maps = visualize.feature_maps(model, image, model.encoder[0])
    visualize.plot_feature_maps(maps, f"{folder}/feature_maps.png",
                                title="what the first U-Net block extracts (16 maps, 64x64)")
    mc.seed(0)
    visualize.compare_gradient_flow(f"{folder}/gradient_flow.png", depth=6, seed=0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
