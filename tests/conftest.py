"""Shared fixtures: the official MNIST files live in ../shared/data/mnist beside the clone."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST_FILES = Path(os.environ.get("JAX_MNIST_TEST_FILES", REPO.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_files() -> Path:
    if not (MNIST_FILES / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"official MNIST files not found in {MNIST_FILES} (set JAX_MNIST_TEST_FILES)")
    return MNIST_FILES


@pytest.fixture(scope="session")
def test_images_raw(mnist_files) -> np.ndarray:
    """The first 64 MNIST test images, uint8 (64, 28, 28, 1), read with plain numpy."""
    with gzip.open(mnist_files / "t10k-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8)
    return data[16 : 16 + 64 * 784].reshape(64, 28, 28, 1)


@pytest.fixture(scope="session")
def test_batch(test_images_raw) -> np.ndarray:
    """The same images normalised as in the study (mean 0.1307, std 0.3081), float32 NHWC."""
    return ((test_images_raw / 255.0 - 0.1307) / 0.3081).astype(np.float32)


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory, mnist_files) -> Path:
    """A fresh tfds data dir, prepared once per test session from the official files."""
    from jax_mnist.data import load_mnist

    data_dir = tmp_path_factory.mktemp("tfds")
    load_mnist(data_dir, mnist_files, download=False)
    return data_dir


@pytest.fixture(scope="session")
def mnist(mnist_data_dir):
    from jax_mnist.data import load_mnist

    return load_mnist(mnist_data_dir, download=False)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache per test session, shared with subprocesses: recompiling the
    same training step (a new Engine per run) then costs a cache read, not a compile."""
    import jax

    path = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    yield path


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, mnist):
    """Seed 1 of the small configuration (tests/helpers.py), trained once per test session."""
    from jax_mnist.run import train
    from tests.helpers import SUBSET, small_recipe

    out = tmp_path_factory.mktemp("straight")
    history = train(small_recipe(), mnist, out, seed=1, train_examples=SUBSET, log=lambda s: None)
    return out, history
