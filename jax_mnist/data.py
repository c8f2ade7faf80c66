"""MNIST through tensorflow-datasets, offline, verified, and without TensorFlow.

``load_mnist`` returns the four arrays (uint8 NHWC images, int32 labels) of the
tfds ``mnist`` dataset (version 3.0.1: same examples, same order as the stock
builder). The path it takes:

1. A decoded-array cache next to the prepared dataset (written atomically,
   checked by its digest): the second load pays no PNG decode.
2. An already prepared ``mnist`` in the tfds data dir: read with
   ``tfds.data_source`` (array_record; a tfrecord one needs TensorFlow).
3. Otherwise the four official files, from the directory the user names or
   the tfds manual dir (``<data_dir>/downloads/manual``): each is checked
   (gzip, IDX magic number, counts, sha256 against the checksums tfds
   registers) and the dataset is prepared as array_record by a TensorFlow-free
   subclass of the stock builder.
4. Only when no files are found anywhere: tfds' own download.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.resources
import io
import json
import logging
import os
import socket
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from jax_mnist.errors import JaxMnistError
from jax_mnist.files import WriteError, write_atomically

MEAN, STD = 0.1307, 0.3081  # of the training pixels scaled to [0, 1]
TFDS_VERSION = "3.0.1"
ENV_DATA_DIR = "JAX_MNIST_DATA_DIR"
ENV_MNIST_FILES = "JAX_MNIST_FILES"
CACHE_NAME = "jax_mnist_arrays.npz"

# split -> (images file, labels file, number of examples)
OFFICIAL_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


class DataError(JaxMnistError, ValueError):
    """Bad or missing MNIST input; the message is one line naming the file, expected vs found."""


@dataclass(frozen=True)
class Mnist:
    train_images: np.ndarray  # uint8 (60000, 28, 28, 1)
    train_labels: np.ndarray  # int32 (60000,)
    test_images: np.ndarray  # uint8 (10000, 28, 28, 1)
    test_labels: np.ndarray  # int32 (10000,)


def validation_indices(num_train: int, validation: int) -> np.ndarray:
    """The training examples held out for validation: ``validation`` of the ``num_train``, evenly
    spaced over the split's order (``floor(i * num_train / validation)``, i = 0 .. validation-1).

    Fixed: they depend on the two sizes alone, never on a run's seed or the machine, so every
    seed and recipe screened with the same ``validation`` is scored on the same examples.
    """
    if not 0 <= validation < num_train:
        raise DataError(
            f"validation must hold out fewer than the {num_train:,} training examples, found {validation:,}"
        )
    return (np.arange(validation, dtype=np.int64) * num_train) // max(validation, 1)


def split_validation(
    images: np.ndarray, labels: np.ndarray, validation: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train images, train labels), (validation images, validation labels))``: the examples of
    ``validation_indices`` held out, the rest kept in their order."""
    held = validation_indices(labels.shape[0], validation)
    if not validation:
        return (images, labels), (images[:0], labels[:0])
    kept = np.ones(labels.shape[0], bool)
    kept[held] = False
    return (images[kept], labels[kept]), (images[held], labels[held])


def validation_digest(num_train: int, validation: int) -> str:
    """sha256 of the held-out indices (int64, little-endian): what a run's config.json records."""
    return hashlib.sha256(validation_indices(num_train, validation).astype("<i8").tobytes()).hexdigest()


def _say(message: str) -> None:
    print(f"[jax_mnist.data] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- official files


# sha256 of each official file's decompressed bytes (gzip -dc FILE | sha256sum, of the files whose
# .gz digests tfds registers): tells a re-compressed copy of the right data from wrong data.
CONTENT_SHA256 = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def registered_checksums() -> dict[str, str]:
    """File name -> sha256, as tensorflow-datasets registers them for ``mnist``."""
    text = (importlib.resources.files("tensorflow_datasets") / "url_checksums" / "mnist.txt").read_text()
    sums = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            sums[fields[3]] = fields[2]
    return sums


def read_idx(path: Path, magic: int, count: int) -> np.ndarray:
    """Read a gzip-compressed IDX file, checking gzip integrity, magic number and counts."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except gzip.BadGzipFile as e:
        if "CRC check failed" in str(e):  # a valid gzip header whose data does not check out
            raise DataError(f"{path}: corrupt gzip data (CRC check failed)") from None
        raise DataError(f"{path}: not a gzip file ({e})") from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip stream ({e})") from None
    if len(raw) < 8:
        raise DataError(f"{path}: expected an IDX header of at least 8 bytes, found {len(raw)} bytes")
    found_magic, found_count = (int(v) for v in np.frombuffer(raw[:8], ">u4"))
    if found_magic != magic:
        raise DataError(f"{path}: expected IDX magic number {magic}, found {found_magic}")
    if found_count != count:
        raise DataError(f"{path}: expected {count} items, found {found_count}")
    header = 16 if magic == IMAGES_MAGIC else 8
    shape = (count, 28, 28, 1) if magic == IMAGES_MAGIC else (count,)
    if magic == IMAGES_MAGIC:
        rows, cols = (int(v) for v in np.frombuffer(raw[8:16], ">u4"))
        if (rows, cols) != (28, 28):
            raise DataError(f"{path}: expected 28x28 images, found {rows}x{cols}")
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(f"{path}: expected {size} data bytes after the header, found {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_official_files(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images, labels) from the four official files, each checked before use."""
    checksums = registered_checksums()
    splits = {}
    for split, (images_name, labels_name, count) in OFFICIAL_FILES.items():
        arrays = []
        for name, magic in ((images_name, IMAGES_MAGIC), (labels_name, LABELS_MAGIC)):
            path = directory / name
            array = read_idx(path, magic, count)
            found = sha256_of(path)
            if found != checksums[name]:
                same_content = (
                    hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == CONTENT_SHA256[name]
                )
                hint = (
                    "; its decompressed content is the official file's: it was compressed again, "
                    "use the original .gz (the checksum tfds registers is of those bytes)"
                    if same_content
                    else ""
                )
                raise DataError(f"{path}: sha256 mismatch: expected {checksums[name]}, found {found}{hint}")
            arrays.append(array)
        splits[split] = (arrays[0], arrays[1])
    return splits


def _files_present(directory: Path | None) -> list[str]:
    if directory is None or not directory.is_dir():
        return []
    names = [n for files in OFFICIAL_FILES.values() for n in files[:2]]
    return [n for n in names if (directory / n).exists()]


# --------------------------------------------------------------------------- tfds


def _local_builder(data_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]):
    """The stock tfds MNIST builder with its download swapped for the verified local arrays.

    Same name, version and features as the stock one, and the same example keys
    (the index in the file), hence the same order; images are PNG-encoded with
    PIL rather than TensorFlow.
    """
    from PIL import Image
    from tensorflow_datasets.image_classification.mnist import MNIST

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image[:, :, 0], mode="L").save(buffer, format="PNG")
        return buffer.getvalue()

    class LocalFilesMNIST(MNIST, skip_registration=True):
        name = "mnist"

        def _split_generators(self, dl_manager):
            return {split: self._examples(*arrays) for split, arrays in splits.items()}

        def _examples(self, images, labels):
            for index, (image, label) in enumerate(zip(images, labels)):
                yield index, {"image": png(image), "label": int(label)}

    return LocalFilesMNIST(data_dir=str(data_dir), file_format="array_record")


def dataset_dir(data_dir: Path) -> Path:
    return data_dir / "mnist" / TFDS_VERSION


def _prepared_format(data_dir: Path) -> str | None:
    info = dataset_dir(data_dir) / "dataset_info.json"
    if not info.exists():
        return None
    return json.loads(info.read_text()).get("fileFormat", "tfrecord")


def _decode_with_data_source(data_dir: Path) -> Mnist:
    import tensorflow_datasets as tfds

    arrays = {}
    try:
        with _quiet_tfds():
            for split in ("train", "test"):
                source = tfds.data_source("mnist", split=split, data_dir=str(data_dir), download=False)
                examples = source.__getitems__(range(len(source)))
                arrays[f"{split}_images"] = np.stack([ex["image"] for ex in examples]).astype(np.uint8)
                arrays[f"{split}_labels"] = np.array([ex["label"] for ex in examples], np.int32)
    except Exception as e:  # noqa: BLE001  (array_record and tfds raise many types for damaged files)
        first_line = (str(e).splitlines() or [""])[0][:160]
        raise DataError(
            f"{dataset_dir(data_dir)}: the prepared mnist is unreadable ({type(e).__name__}: {first_line}); "
            "delete that directory and run again to rebuild it from the official files"
        ) from None
    return Mnist(**arrays)


@contextlib.contextmanager
def _quiet_tfds():
    """tfds' progress bars only on a terminal, its stdout banner and absl warnings (OpenCV missing:
    PIL decodes instead) out of the user's way; every setting is put back afterwards."""
    from tensorflow_datasets.core.utils import tqdm_utils

    absl = logging.getLogger("absl")
    level, bars = absl.level, tqdm_utils._active  # tfds has no getter for its bar switch
    absl.setLevel(logging.ERROR)
    tqdm_utils.display_progress_bar(sys.stderr.isatty())
    try:
        with contextlib.redirect_stdout(sys.stderr if sys.stderr.isatty() else io.StringIO()):
            yield
    finally:
        absl.setLevel(level)
        tqdm_utils.display_progress_bar(bars)


def _decode_with_tensorflow(data_dir: Path) -> Mnist:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise DataError(
            f"{dataset_dir(data_dir)}: mnist is prepared in tfrecord format, which only TensorFlow reads; "
            "install tensorflow-cpu, or point --data-dir at another directory so that jax_mnist "
            "prepares a TensorFlow-free (array_record) copy from the official files"
        ) from None
    import tensorflow_datasets as tfds

    arrays = {}
    for split in ("train", "test"):
        ds = tfds.as_numpy(
            tfds.load("mnist", split=split, data_dir=str(data_dir), batch_size=-1, download=False)
        )
        arrays[f"{split}_images"] = ds["image"].astype(np.uint8)
        arrays[f"{split}_labels"] = ds["label"].astype(np.int32)
    return Mnist(**arrays)


def _tfds_download(data_dir: Path) -> None:
    """tfds' stock download and prepare (needs the network and TensorFlow)."""
    import tensorflow_datasets as tfds

    with _quiet_tfds():
        tfds.builder("mnist", data_dir=str(data_dir)).download_and_prepare()


def _network_reachable(timeout: float = 3.0) -> str | None:
    """None if the host tfds downloads MNIST from answers within ``timeout`` s, else why not."""
    from tensorflow_datasets.image_classification import mnist

    host = urlparse(mnist._MNIST_URL).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"{host} unreachable: {e.strerror or e}"
    return None


# --------------------------------------------------------------------------- decoded-array cache


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def write_cache(path: Path, mnist: Mnist) -> None:
    """Write the arrays and their digest to a temporary file, then rename it into place.

    The rename is atomic, so an interrupted write leaves no cache file that a later load would
    trust (and no temporary file).
    """
    arrays = dict(vars(mnist))
    write_atomically(path, lambda f: np.savez(f, digest=np.array(_digest(arrays)), **arrays))


def read_cache(path: Path) -> Mnist | None:
    """The cached arrays, or None (and a note) when the cache is missing, unreadable or fails its digest."""
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
            digest = str(f["digest"])
    except Exception as e:  # any unreadable cache is rebuilt, never trusted
        _say(f"ignoring unreadable cache {path} ({e})")
        return None
    if digest != _digest(arrays):
        _say(f"ignoring cache {path}: its digest does not match its contents")
        return None
    return Mnist(**arrays)


# --------------------------------------------------------------------------- public entry point


def default_data_dir() -> Path:
    return Path(
        os.environ.get(ENV_DATA_DIR) or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    ).expanduser()


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    mnist_files: str | os.PathLike | None = None,
    *,
    download: bool = True,
    log: Callable[[str], None] = _say,
) -> Mnist:
    """MNIST as uint8 NHWC images and int32 labels, through tfds, never needing TensorFlow.

    ``data_dir``: the tfds data dir (default ``$JAX_MNIST_DATA_DIR``, ``$TFDS_DATA_DIR``
    or ``~/tensorflow_datasets``). ``mnist_files``: a directory holding the four
    official ``.gz`` files (default ``$JAX_MNIST_FILES``; else the tfds manual dir
    ``<data_dir>/downloads/manual``). ``download=False`` forbids tfds' network
    download when no files are found.
    """
    start = time.perf_counter()
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    mnist_files = mnist_files or os.environ.get(ENV_MNIST_FILES) or None
    cache = dataset_dir(data_dir) / CACHE_NAME

    mnist = read_cache(cache)
    if mnist is not None:
        log(f"loaded decoded arrays from {cache} in {time.perf_counter() - start:.2f} s")
        return mnist

    file_format = _prepared_format(data_dir)
    if file_format is None:
        _prepare(data_dir, Path(mnist_files).expanduser() if mnist_files else None, download, log)
        file_format = _prepared_format(data_dir)
    if file_format == "array_record":
        mnist = _decode_with_data_source(data_dir)
    else:
        mnist = _decode_with_tensorflow(data_dir)
    _check_loaded(mnist, dataset_dir(data_dir))
    try:
        write_cache(cache, mnist)
        cached = f"cached to {cache}"
    except WriteError as e:  # a read-only or full disk: the arrays are decoded, go on without the cache
        cached = f"not cached ({e}); the next load decodes again"
    log(f"loaded and decoded {dataset_dir(data_dir)} in {time.perf_counter() - start:.2f} s; {cached}")
    return mnist


def _prepare(data_dir: Path, mnist_files: Path | None, download: bool, log) -> None:
    manual_dir = data_dir / "downloads" / "manual"
    if mnist_files is not None and not mnist_files.is_dir():
        raise DataError(f"{mnist_files}: MNIST files directory not found")
    source = next((d for d in (mnist_files, manual_dir) if _files_present(d)), None)
    if source is None:
        where = f"{mnist_files} (or {manual_dir})" if mnist_files else str(manual_dir)
        hint = (
            "put the four official MNIST files "
            f"({', '.join(n for f in OFFICIAL_FILES.values() for n in f[:2])}) "
            f"in {where}, or name their directory with --mnist-files / ${ENV_MNIST_FILES}"
        )
        if not download:
            raise DataError(f"no MNIST files found and download is off: {hint}")
        unreachable = _network_reachable()
        # Fail in seconds, before tfds starts (it would retry for minutes, leaving .tmp files).
        if unreachable:
            raise DataError(f"no MNIST files found and no network for tfds' download ({unreachable}): {hint}")
        log("no MNIST files found; trying tensorflow-datasets' own download")
        try:
            _tfds_download(data_dir)
        except Exception as e:
            raise DataError(
                f"tfds download of mnist failed ({type(e).__name__}: {str(e)[:200]}); {hint}"
            ) from None
        return
    splits = read_official_files(source)  # raises DataError naming the file before anything is written
    log(
        f"verified the official files in {source}; preparing tfds mnist {TFDS_VERSION} (array_record) in "
        f"{data_dir}"
    )
    # tfds builds into a temporary directory and renames it when complete, so an
    # interrupted prepare never leaves a dataset that looks prepared.
    try:
        with _quiet_tfds():
            _local_builder(data_dir, splits).download_and_prepare(file_format="array_record")
    except OSError as e:  # a read-only HOME, a full disk, a path through a file
        raise DataError(
            f"{data_dir}: cannot prepare the dataset there ({e.strerror or type(e).__name__}); "
            f"name a writable tfds data dir with --data-dir or ${ENV_DATA_DIR}"
        ) from None


def _check_loaded(mnist: Mnist, where: Path) -> None:
    for split, (_, _, count) in OFFICIAL_FILES.items():
        images, labels = getattr(mnist, f"{split}_images"), getattr(mnist, f"{split}_labels")
        if images.shape != (count, 28, 28, 1) or labels.shape != (count,):
            raise DataError(
                f"{where}: {split} split: expected images ({count}, 28, 28, 1) and labels ({count},), "
                f"found {images.shape} and {labels.shape}"
            )
