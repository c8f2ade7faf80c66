"""Shared fixtures and the two test tiers.

The official MNIST files live in ../shared/data/mnist beside the clone. Tiers: a test is ``slow``
when it is marked so (it spawns processes, or is long) or when it uses a fixture that trains a
run (``TRAINING_FIXTURES``); ``python -m pytest -q -m "not slow"`` is the fast loop, the plain
command runs both tiers.
"""

import fcntl
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST_FILES = Path(os.environ.get("JAX_MNIST_TEST_FILES", REPO.parent / "shared" / "data" / "mnist"))
# The tfds dir prepared from the official files, kept across test runs (preparing PNG-encodes
# 70,000 images); ignored by git. JAX_MNIST_TEST_CACHE moves it.
TEST_CACHE = Path(os.environ.get("JAX_MNIST_TEST_CACHE", REPO / ".pytest_cache" / "jax_mnist"))

# Fixtures that train a run (seconds to minutes each): every test using one is in the slow tier.
TRAINING_FIXTURES = {"straight_run", "finished", "run_dir", "multi_run", "single_runs", "old_run"}


@pytest.fixture(autouse=True)
def _reap_spawned():
    """No process a test spawned (tests.helpers.spawn) outlives it, whether it passed or not."""
    from tests.helpers import SPAWNED, reap

    yield
    reap(SPAWNED)
    SPAWNED.clear()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


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
def mnist_data_dir(mnist_files) -> Path:
    """A tfds data dir prepared from the official files, once, and kept for later test runs.

    Prepared in a temporary directory and renamed into place, so an interrupted run leaves no
    half-prepared cache; ``load_mnist`` checks its decoded arrays against their digest on load.
    Under a file lock: the full suite's workers (pytest -n 2) start at once, and the second must
    wait for the first's cache, not replace it while the first reads it."""
    from jax_mnist.data import load_mnist

    data_dir = TEST_CACHE / "tfds"
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    with open(TEST_CACHE / "prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (data_dir / "mnist" / "3.0.1" / "jax_mnist_arrays.npz").exists():
            staging = Path(tempfile.mkdtemp(dir=TEST_CACHE, prefix="tfds-"))
            load_mnist(staging, mnist_files, download=False)
            shutil.rmtree(data_dir, ignore_errors=True)
            os.rename(staging, data_dir)
    return data_dir


@pytest.fixture(scope="session")
def mnist(mnist_data_dir):
    from jax_mnist.data import load_mnist

    return load_mnist(mnist_data_dir, download=False)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache per test session, shared with subprocesses: recompiling the
    same training step (new programs per run) then costs a cache read, not a compile."""
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
