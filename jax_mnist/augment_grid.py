"""A PNG grid of originals and augmented copies, to look at what augmentation does."""

from __future__ import annotations

import jax
import numpy as np

from jax_mnist.augment import random_affine


def write_augment_grid(path, images_uint8: np.ndarray, copies: int, seed: int, **affine) -> None:
    """One row per image: the original, then ``copies`` augmented draws (2-pixel grey gaps)."""
    from PIL import Image

    n = images_uint8.shape[0]
    keys = jax.random.split(jax.random.key(seed), copies)
    columns = [images_uint8] + [
        np.asarray(random_affine(k, images_uint8.astype(np.float32), fill=0.0, **affine)).astype(np.uint8)
        for k in keys
    ]
    cell, gap = 28, 2
    grid = np.full((n * (cell + gap) + gap, (copies + 1) * (cell + gap) + gap), 128, np.uint8)
    for col, batch in enumerate(columns):
        for row in range(n):
            y, x = gap + row * (cell + gap), gap + col * (cell + gap)
            grid[y : y + cell, x : x + cell] = batch[row, :, :, 0]
    Image.fromarray(grid, mode="L").resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
