"""MNIST digits made to look like photos of a digit on paper, to test ``jax-mnist predict``.

Each style starts from a 28x28 MNIST digit (white ink on black), scales it up 5x (each pixel a
5x5 block: the same digit at a higher resolution) and draws it
as dark ink onto paper: ``offwhite`` (flat, 225 of 255), ``gradient`` (uneven light, 140 to 250
across the sheet), ``noisy`` (flat paper, grain of sigma 12), ``exif`` (off-white, stored rotated
with the EXIF orientation that turns it upright), ``alpha`` (RGBA: black ink whose shape is only
in the alpha channel, the rest transparent). ``clean`` is the digit itself.
"""

import numpy as np
from PIL import Image

STYLES = ("clean", "offwhite", "gradient", "noisy", "exif", "alpha")
SCALE, MARGIN, INK = 5, 20, 40.0


def photo_like(digit: np.ndarray, style: str, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """(image, save options) of ``digit`` (uint8 28x28) in ``style``."""
    if style == "clean":
        return Image.fromarray(digit), {}
    size = 28 * SCALE
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.NEAREST), np.float64) / 255
    ink = np.pad(ink, MARGIN)
    if style == "alpha":
        rgba = np.zeros((*ink.shape, 4), np.uint8)
        rgba[..., 3] = np.round(255 * ink).astype(np.uint8)
        return Image.fromarray(rgba, "RGBA"), {}
    side = ink.shape[0]
    paper = np.full((side, side), 225.0)
    if style == "gradient":
        paper = np.linspace(140.0, 250.0, side)[None, :].repeat(side, 0)
    photo = paper * (1 - ink) + INK * ink
    if style == "noisy":
        photo += rng.normal(0, 12, photo.shape)
    image = Image.fromarray(np.clip(np.round(photo), 0, 255).astype(np.uint8)).convert("RGB")
    if style == "exif":
        # Orientation 8 means "rotate 90 degrees clockwise to view": store it turned the other way.
        exif = Image.Exif()
        exif[0x0112] = 8
        return image.transpose(Image.Transpose.ROTATE_270), {"exif": exif}
    return image, {}


def write_photo_set(images: np.ndarray, directory, seed: int = 0) -> dict[str, list]:
    """Every style of each digit in ``images`` (N, 28, 28[, 1]) as files in ``directory``:
    style -> the paths, in the order of ``images``."""
    from pathlib import Path

    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {style: [] for style in STYLES}
    for k, digit in enumerate(images.reshape(len(images), 28, 28)):
        for style in STYLES:
            image, options = photo_like(digit, style, rng)
            path = directory / f"{k:04d}-{style}.{'jpg' if style in ('noisy', 'exif') else 'png'}"
            image.save(path, **options, **({"quality": 92} if path.suffix == ".jpg" else {}))
            paths[style].append(path)
    return paths
