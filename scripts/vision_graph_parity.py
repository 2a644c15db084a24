"""The exported vision graph (ONNX Runtime) against the PyTorch vision tower + projector.

    python scripts/vision_graph_parity.py EXPORT_DIR [--model default]
"""

import argparse

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("--model", default="default")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()

    from cspkv.engines.onnx_runtime import OrtEngine
    from cspkv.export.graphs import VisionGraph
    from cspkv.models.registry import load_model

    model, _, _ = load_model(args.model)
    engine = OrtEngine(args.export_dir)
    size = engine.image_size
    pixels = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = VisionGraph(model.float().eval())(pixels).numpy()
    got = engine.image_features(pixels.numpy())
    print(f"vision graph vs PyTorch: {args.images} images, features {list(got.shape)}, "
          f"max |diff| {np.abs(got - expected).max():.3e}, max |feature| {np.abs(expected).max():.2f}")


if __name__ == "__main__":
    main()
