import gzip
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jax_mnist import data
from jax_mnist.data import CACHE_NAME, DataError, dataset_dir, load_mnist

TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_real_data_counts_labels_and_statistics(mnist):
    assert mnist.train_images.shape == (60_000, 28, 28, 1) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10_000, 28, 28, 1) and mnist.test_images.dtype == np.uint8
    assert np.bincount(mnist.train_labels).tolist() == TRAIN_LABEL_COUNTS
    assert np.bincount(mnist.test_labels).tolist() == TEST_LABEL_COUNTS
    pixels = mnist.train_images / 255.0
    assert round(float(pixels.mean()), 4) == 0.1307
    assert round(float(pixels.std()), 4) == 0.3081


def test_same_examples_as_the_official_files(mnist, mnist_files):
    """tfds orders examples by key hash; as a multiset they are exactly the official files."""
    test_images = data.read_idx(mnist_files / "t10k-images-idx3-ubyte.gz", data.IMAGES_MAGIC, 10_000)
    test_labels = data.read_idx(mnist_files / "t10k-labels-idx1-ubyte.gz", data.LABELS_MAGIC, 10_000)
    key = lambda images, labels: sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels))
    assert key(mnist.test_images, mnist.test_labels) == key(test_images, test_labels)


def test_second_load_uses_cache_without_tfds(mnist_data_dir, monkeypatch):
    monkeypatch.setattr(data, "_decode_with_data_source", lambda d: pytest.fail("decoded again"))
    again = load_mnist(mnist_data_dir, download=False)
    assert again.train_images.shape == (60_000, 28, 28, 1)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_prepared_dataset_is_reused_when_cache_is_gone(mnist_data_dir, tmp_path, mnist):
    copy = tmp_path / "tfds"
    shutil.copytree(mnist_data_dir, copy)
    (dataset_dir(copy) / CACHE_NAME).unlink()
    # No files are named and the manual dir is empty: only the prepared dataset can serve.
    reloaded = load_mnist(copy, download=False)
    np.testing.assert_array_equal(reloaded.test_images, mnist.test_images)
    assert (dataset_dir(copy) / CACHE_NAME).exists()


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_corrupt_cache_is_not_trusted(mnist_data_dir, tmp_path, mnist):
    copy = tmp_path / "tfds"
    shutil.copytree(mnist_data_dir, copy)
    cache = dataset_dir(copy) / CACHE_NAME
    with np.load(cache) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["test_labels"] = arrays["test_labels"].copy()
    arrays["test_labels"][0] ^= 1
    np.savez(cache, **arrays)
    reloaded = load_mnist(copy, download=False)
    np.testing.assert_array_equal(reloaded.test_labels, mnist.test_labels)


def test_interrupted_cache_write_leaves_no_trusted_cache(tmp_path, monkeypatch, mnist):
    path = tmp_path / CACHE_NAME

    def dies_midway(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        data.write_cache(path, mnist)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    data.write_cache(path, mnist)
    assert data.read_cache(path).test_labels.tolist() == mnist.test_labels.tolist()


@pytest.mark.slow  # spawns processes
def test_loader_does_not_import_tensorflow(mnist_data_dir):
    code = (
        "import sys; from jax_mnist.data import load_mnist; "
        f"load_mnist({str(mnist_data_dir)!r}, download=False); print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- bad input


def _copy_files(src, dst):
    dst.mkdir()
    for f in src.glob("*.gz"):
        shutil.copy(f, dst / f.name)
    return dst


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _labels_raw(mnist_files) -> bytes:
    return gzip.decompress((mnist_files / "t10k-labels-idx1-ubyte.gz").read_bytes())


BAD_CASES = {
    "missing": (None, "file not found"),
    "truncated": (lambda raw_gz, raw: raw_gz[: len(raw_gz) // 2], "truncated or corrupt gzip"),
    "not_gzip": (lambda raw_gz, raw: raw, "not a gzip file"),
    "wrong_sha256": (
        lambda raw_gz, raw: _gz(raw[:8] + bytes([(raw[8] + 1) % 10]) + raw[9:]),
        "sha256 mismatch: expected f7ae60f9",
    ),
    "wrong_magic": (
        lambda raw_gz, raw: _gz((2051).to_bytes(4, "big") + raw[4:]),
        "expected IDX magic number 2049, found 2051",
    ),
    "wrong_count": (
        lambda raw_gz, raw: _gz(raw[:4] + (9999).to_bytes(4, "big") + raw[8:-1]),
        "expected 10000 items, found 9999",
    ),
    "wrong_length": (
        lambda raw_gz, raw: _gz(raw[:-5]),
        "expected 10000 data bytes after the header, found 9995",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_files_give_one_line_errors_and_leave_nothing(case, tmp_path, mnist_files):
    files = _copy_files(mnist_files, tmp_path / "files")
    target = files / "t10k-labels-idx1-ubyte.gz"
    make, message = BAD_CASES[case]
    if make is None:
        target.unlink()
    else:
        target.write_bytes(make(target.read_bytes(), _labels_raw(mnist_files)))
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError) as e:
        load_mnist(data_dir, files, download=False)
    text = str(e.value)
    assert "\n" not in text
    assert str(target) in text and message in text
    assert "decompressed content is the official" not in text  # changed data gets no such note
    assert not (data_dir / "mnist").exists()  # nothing prepared that a later load could trust


def test_a_recompressed_official_file_is_refused_with_a_note_that_its_content_is_right(tmp_path, mnist_files):
    files = _copy_files(mnist_files, tmp_path / "files")
    target = files / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(_gz(_labels_raw(mnist_files)))  # same bytes inside, other gzip header
    with pytest.raises(
        DataError, match=r"sha256 mismatch: .*; its decompressed content is the official file's"
    ):
        load_mnist(tmp_path / "tfds", files, download=False)


def test_bad_file_in_tfds_manual_dir_is_caught_too(tmp_path, mnist_files):
    data_dir = tmp_path / "tfds"
    (data_dir / "downloads").mkdir(parents=True)
    manual = _copy_files(mnist_files, data_dir / "downloads" / "manual")
    (manual / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a gzip file"):
        load_mnist(data_dir, download=False)


def test_named_files_directory_must_exist(tmp_path):
    with pytest.raises(DataError, match="nowhere: MNIST files directory not found"):
        load_mnist(tmp_path / "tfds", tmp_path / "nowhere", download=False)


def test_a_data_dir_that_cannot_be_written_is_one_line_naming_it_and_the_option(tmp_path, mnist_files):
    """As a read-only HOME under the default data dir; a path through a file fails alike (and does
    for root too, whom permissions would not stop)."""
    (tmp_path / "a-file").write_text("")
    data_dir = tmp_path / "a-file" / "tfds"
    with pytest.raises(
        DataError, match=r"a-file/tfds: cannot prepare the dataset there \(.*\); name a writable"
    ):
        load_mnist(data_dir, mnist_files, download=False)


def test_no_files_and_no_download_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match=r"put the four official MNIST files .* in .*downloads/manual"):
        load_mnist(tmp_path / "tfds", download=False)


def test_failed_download_says_where_to_put_files(tmp_path, monkeypatch):
    def offline(data_dir):
        raise ConnectionError("no network")

    monkeypatch.setattr(
        data, "_network_reachable", lambda timeout=3.0: None
    )  # the host answers, the download fails
    monkeypatch.setattr(data, "_tfds_download", offline)
    with pytest.raises(
        DataError, match=r"tfds download of mnist failed \(ConnectionError: no network\); put the"
    ):
        load_mnist(tmp_path / "tfds")


def test_tfrecord_dataset_without_tensorflow_is_explained(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # TensorFlow absent, even where it is installed
    info = dataset_dir(tmp_path) / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text('{"name": "mnist", "fileFormat": "tfrecord"}')
    with pytest.raises(DataError, match="prepared in tfrecord format, which only TensorFlow reads"):
        load_mnist(tmp_path, download=False)
