"""A trained run used as a classifier: per-image probabilities, a scored test set, images from files.

``evaluate_run`` scores a checkpoint on a labelled set (loss, accuracy, per-class accuracy,
confusion matrix, every prediction); ``write_evaluation`` stores it as
``evaluation-<checkpoint>.json`` (the figures) and ``predictions-<checkpoint>.npz`` (per image:
label, predicted class, probabilities; plus the misclassified images themselves, so a report can
draw them from the run directory alone). ``read_image`` turns any image file into an MNIST-like
28x28 uint8 digit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.engine import make_model, normalize, preprocess
from jax_mnist.errors import JaxMnistError
from jax_mnist.files import WriteError, write_atomically
from jax_mnist.recipes import Recipe
from jax_mnist.rundir import Run
from jax_mnist.zoo import S7Net

NUM_CLASSES = 10


class ImageError(JaxMnistError, ValueError):
    """An image file that cannot be read as a digit."""


def inference_model(recipe: Recipe, conv_impl: str | None = None) -> S7Net:
    """The recipe's network for inference on the default device (``conv_impl`` overrides it)."""
    if conv_impl is not None:
        recipe = dataclasses.replace(recipe, conv_impl=conv_impl)
    return make_model(recipe, jax.devices()[0].platform)


def variables_of(run: Run) -> dict:
    return run.variables


def log_probabilities_fn(model: S7Net):
    """``f(variables, images_uint8 (N, 28, 28, 1)) -> log-probabilities (N, 10)``: the whole
    preprocessing (scale, normalise) and the network in eval mode."""

    def apply(variables, images_uint8):
        return model.apply(variables, normalize(preprocess(images_uint8)), train=False)

    return apply


def log_probabilities(
    model: S7Net, variables: dict, images_uint8: np.ndarray, batch_size: int = 1000
) -> np.ndarray:
    """Log-probabilities of every image, float32 (N, 10); one compiled batch shape (the last batch padded)."""
    apply = jax.jit(log_probabilities_fn(model))
    n = len(images_uint8)
    batch_size = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, batch_size):
        batch = images_uint8[start : start + batch_size]
        pad = batch_size - len(batch)
        padded = np.pad(batch, ((0, pad), (0, 0), (0, 0), (0, 0))) if pad else batch
        out.append(np.asarray(apply(variables, jnp.asarray(padded)))[: len(batch)])
    return np.concatenate(out).astype(np.float32)


# --------------------------------------------------------------------------- evaluation


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(10, 10) counts: row = true class, column = predicted class."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A checkpoint scored on a labelled set."""

    run_dir: str
    checkpoint: str  # "best", "last" or an epoch number, as asked
    epoch: int  # the epoch whose weights were scored
    labels: np.ndarray  # (N,) int
    log_probabilities: np.ndarray  # (N, 10) float32
    images: np.ndarray  # (N, 28, 28, 1) uint8, kept for the misclassified ones

    @property
    def probabilities(self) -> np.ndarray:
        return np.exp(self.log_probabilities)

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.log_probabilities, axis=1)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood, as in training's metrics."""
        picked = self.log_probabilities[np.arange(len(self.labels)), self.labels]
        return float(-np.mean(picked.astype(np.float64)))

    @property
    def accuracy(self) -> float:
        return 100.0 * float(np.mean(self.predicted == self.labels))

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.predicted)

    @property
    def per_class_accuracy(self) -> list[float]:
        matrix = self.confusion
        return [100.0 * matrix[c, c] / max(1, matrix[c].sum()) for c in range(NUM_CLASSES)]

    @property
    def misclassified(self) -> np.ndarray:
        """Indices of the wrong predictions, most confident first (ties by index)."""
        wrong = np.flatnonzero(self.predicted != self.labels)
        confidence = self.log_probabilities[wrong, self.predicted[wrong]]
        return wrong[np.lexsort((wrong, -confidence))]

    def summary(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "checkpoint": self.checkpoint,
            "epoch": self.epoch,
            "examples": int(len(self.labels)),
            "loss": self.loss,
            "accuracy": self.accuracy,
            "errors": int(np.sum(self.predicted != self.labels)),
            "per_class_accuracy": {str(c): a for c, a in enumerate(self.per_class_accuracy)},
            "confusion": self.confusion.tolist(),
        }


def evaluate_run(run: Run, checkpoint: str | int, images_uint8: np.ndarray, labels: np.ndarray) -> Evaluation:
    model = inference_model(run.recipe)
    logp = log_probabilities(model, variables_of(run), images_uint8, run.recipe.eval_batch_size)
    return Evaluation(
        str(run.out), str(checkpoint), run.epoch, np.asarray(labels, np.int64), logp, images_uint8
    )


def evaluation_paths(run_dir: str | os.PathLike, checkpoint: str | int) -> tuple[Path, Path]:
    """Where ``write_evaluation`` puts the figures (JSON) and the predictions (npz) of a checkpoint."""
    name = checkpoint if checkpoint in ("best", "last") else f"epoch-{int(checkpoint)}"
    return Path(run_dir) / f"evaluation-{name}.json", Path(run_dir) / f"predictions-{name}.npz"


def write_evaluation(evaluation: Evaluation, json_path: Path, predictions_path: Path) -> None:
    wrong = evaluation.misclassified
    arrays = dict(
        label=evaluation.labels.astype(np.uint8),
        predicted=evaluation.predicted.astype(np.uint8),
        probabilities=evaluation.probabilities.astype(np.float32),
        misclassified_index=wrong.astype(np.int32),  # most confident first
        misclassified_images=evaluation.images[wrong].astype(np.uint8),
        epoch=np.int32(evaluation.epoch),
    )
    try:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{predictions_path.parent}: cannot create the directory ({e.strerror})") from None
    write_atomically(predictions_path, lambda f: np.savez_compressed(f, **arrays))
    write_atomically(json_path, json.dumps(evaluation.summary(), indent=1) + "\n")


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What ``write_evaluation`` stored, read back."""

    label: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    misclassified_index: np.ndarray
    misclassified_images: np.ndarray
    epoch: int

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.label, self.predicted)


def read_predictions(path: str | os.PathLike) -> Predictions:
    fields = [f.name for f in dataclasses.fields(Predictions)]
    try:
        with np.load(path) as stored:
            missing = [f for f in fields if f not in stored]
            if missing:
                raise JaxMnistError(
                    f"{path}: not a predictions file of jax-mnist evaluate (missing {missing})"
                )
            values = {f: stored[f] for f in fields}
    except FileNotFoundError:
        raise JaxMnistError(f"{path}: no such file (make it with: jax-mnist evaluate RUN_DIR)") from None
    except (OSError, ValueError) as e:
        raise JaxMnistError(f"{path}: not a readable .npz file ({e})") from None
    values["epoch"] = int(values["epoch"])
    return Predictions(**values)


# --------------------------------------------------------------------------- images from files

MNIST_SIZE = 28
MNIST_BOX = 20  # MNIST digits were scaled to fit 20x20, then centred by mass in 28x28


# Larger images are refused before their pixels are decoded (a 20000x20000 PNG is 400 MB of pixels).
MAX_PIXELS = 40_000_000
EXIF_ORIENTATION = 0x0112
# Below this contrast (of 255) between the ink and the paper, after the lighting is removed, an
# image holds no digit to read.
MIN_INK_CONTRAST = 24.0


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """An image file as an MNIST digit: uint8 (28, 28, 1), white ink on black; and what was done.

    - EXIF orientation is applied; an image with several frames (an animated GIF) is refused.
    - Transparency is composited onto a background of the opposite brightness to the opaque
      pixels, so ink drawn only in the alpha channel stays visible.
    - A 28x28 image is used as it is (inverted when its border is light). Any other size is read
      as a photo: the paper's brightness is estimated per region (a grey opening wider than a
      stroke), removed, and what is left is stretched to full contrast and thresholded so that
      shading and paper grain drop out; then it is prepared as MNIST was (cropped to the ink,
      fitted to 20x20, centred by mass in 28x28).
    - No ink left (a blank, uniform or 1-pixel image) is an ``ImageError``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {width}x{height} pixels is too large (at most {MAX_PIXELS:,} pixels)"
                    )
                frames = getattr(image, "n_frames", 1)
                if frames > 1:
                    raise ImageError(
                        f"{path}: an image of {frames} frames; save the frame to classify as its own file"
                    )
                if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    notes.append("turned upright by its EXIF orientation")
                gray = _opaque_gray(ImageOps.exif_transpose(image), notes)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"{path}: too large to decode safely (at most {MAX_PIXELS:,} pixels)") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read the image ({e})") from None
    dark_on_light = bool(np.median(_border(gray)) > 127)
    if dark_on_light:
        notes.append("inverted (dark digit on a light background)")
    if gray.shape == (MNIST_SIZE, MNIST_SIZE):
        gray = 255.0 - gray if dark_on_light else gray
        if float(gray.max()) - float(np.median(_border(gray))) < MIN_INK_CONTRAST:
            raise ImageError(f"{path}: no ink found (a blank or uniform image)")
        return np.clip(np.round(gray), 0, 255).astype(np.uint8)[:, :, None], notes
    ink = _ink_of_photo(gray, dark_on_light)
    if ink is None:
        raise ImageError(f"{path}: no ink found (a blank or uniform image)")
    notes.append(
        f"read as a photo: lighting removed, {gray.shape[1]}x{gray.shape[0]} fitted as MNIST was "
        "(ink to 20x20, centred by mass)"
    )
    return _fit_like_mnist(ink)[:, :, None], notes


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _opaque_gray(image, notes: list[str]) -> np.ndarray:
    """Grayscale float pixels, transparency composited onto a contrasting background."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return np.asarray(image.convert("L"), np.float64)
    rgba = np.asarray(image.convert("RGBA"), np.float64)
    alpha = rgba[..., 3] / 255.0
    luminance = np.asarray(image.convert("RGBA").convert("L"), np.float64)
    opaque = alpha > 0.5
    ink_is_dark = not opaque.any() or float(luminance[opaque].mean()) < 128
    background = 255.0 if ink_is_dark else 0.0
    notes.append(f"transparency composited onto {'white' if ink_is_dark else 'black'}")
    return alpha * luminance + (1 - alpha) * background


def _ink_of_photo(gray: np.ndarray, dark_on_light: bool) -> np.ndarray | None:
    """Bright ink on black (uint8) from a photo-like image, or None where no ink stands out."""
    from PIL import Image
    from scipy import ndimage

    # Work at most 256 pixels on the long side: the digit ends as 20x20.
    scale = min(1.0, 256 / max(gray.shape))
    if scale < 1.0:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = np.asarray(
            Image.fromarray(gray.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX)
        )
    if min(gray.shape) < 3:
        return None
    gray = ndimage.median_filter(gray, size=3)  # paper grain and sensor noise, not strokes
    # The paper: what is left when every structure narrower than a fifth of the image (strokes
    # are narrower) is closed (dark ink) or opened (light ink) away, smoothed.
    width = max(3, (max(gray.shape) // 5) | 1)
    if dark_on_light:
        paper = ndimage.uniform_filter(ndimage.grey_closing(gray, size=(width, width)), size=width)
        # Light falls on paper and ink alike: the ink is what the paper does not reflect.
        ink = 255.0 * np.clip(1.0 - gray / np.maximum(paper, 1.0), 0, 1)
    else:
        paper = ndimage.uniform_filter(ndimage.grey_opening(gray, size=(width, width)), size=width)
        ink = np.clip(gray - paper, 0, None)
    strongest = float(np.percentile(ink, 99.5))
    if strongest < MIN_INK_CONTRAST:
        return None
    # What is left of the grain is well below the strokes: keep what reaches a third of the
    # stroke level, and of that only the pieces of at least 5 % of the largest (specks would
    # widen the crop and shrink the digit).
    kept = ink >= strongest / 3
    pieces, count = ndimage.label(kept)
    sizes = np.bincount(pieces.ravel())[1:]
    kept &= np.isin(pieces, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    return np.clip(np.where(kept, ink, 0.0) * (255.0 / strongest), 0, 255).astype(np.uint8)


def _fit_like_mnist(gray: np.ndarray) -> np.ndarray:
    from PIL import Image

    ink = np.argwhere(gray > 0.25 * max(1, int(gray.max())))
    if len(ink) == 0:
        return np.zeros((MNIST_SIZE, MNIST_SIZE), np.uint8)
    (top, left), (bottom, right) = ink.min(0), ink.max(0) + 1
    crop = gray[top:bottom, left:right]
    scale = MNIST_BOX / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    # Area averaging, as a sensor integrates light: a digit drawn at any multiple of MNIST's size
    # comes back as the same pixels (Lanczos' ringing and sharpening cost a weak model ~8 points).
    small = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BOX), np.float64)
    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE))
    mass = small.sum() or 1.0
    rows, cols = np.indices(small.shape)
    centre_row, centre_col = (rows * small).sum() / mass, (cols * small).sum() / mass
    top = int(np.clip(round(MNIST_SIZE / 2 - centre_row), 0, MNIST_SIZE - height))
    left = int(np.clip(round(MNIST_SIZE / 2 - centre_col), 0, MNIST_SIZE - width))
    canvas[top : top + height, left : left + width] = small
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)
