#!/usr/bin/env python
"""Accuracy of `jax-mnist predict`'s image reading on photo-like images vs the same clean digits.

Draws the first N MNIST test digits in every style of tests/photos.py (off-white, gradient and
noisy paper, EXIF-rotated, ink only in alpha), reads each file as `jax-mnist predict` does
(`inference.read_image`) and scores them with a run's weights.
Usage: python scripts/photo_accuracy.py RUN_DIR [N] [--mnist-files DIR]   (N default 300)
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/photos.py

from jax_mnist.data import load_mnist  # noqa: E402
from jax_mnist.inference import inference_model, log_probabilities, read_image  # noqa: E402
from jax_mnist.rundir import load_run  # noqa: E402
from tests.photos import STYLES, write_photo_set  # noqa: E402


def photo_accuracies(run_dir, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Style -> accuracy (%) of ``run_dir``'s last checkpoint on ``images`` drawn in that style."""
    run = load_run(run_dir)
    model = inference_model(run.recipe)
    with tempfile.TemporaryDirectory() as directory:
        paths = write_photo_set(images, directory)
        result = {}
        for style in STYLES:
            batch = np.stack([read_image(path)[0] for path in paths[style]])
            predicted = np.argmax(log_probabilities(model, run.variables, batch), -1)
            result[style] = 100.0 * float(np.mean(predicted == labels))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("n", nargs="?", type=int, default=300)
    parser.add_argument("--mnist-files")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    mnist = load_mnist(args.data_dir, args.mnist_files, download=False)
    accuracies = photo_accuracies(args.run_dir, mnist.test_images[: args.n], mnist.test_labels[: args.n])
    print(f"{args.run_dir}, the first {args.n} test digits:")
    for style, accuracy in accuracies.items():
        print(f"  {style:<9} {accuracy:6.2f} %  ({accuracy - accuracies['clean']:+.2f} vs clean)")


if __name__ == "__main__":
    main()
