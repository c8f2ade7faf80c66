"""The fused dropout: its hash is Threefry-2x32, its words are jax.random.bits', its mask has the
right law."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from jax_mnist.dropout import Dropout, drop_threshold, dropout, random_bits, threefry2x32


def test_unrolled_hash_is_threefry_2x32():
    k0, k1 = np.uint32(0x13198A2E), np.uint32(0x03707344)
    counts = jnp.arange(2 * 4099, dtype=jnp.uint32)  # JAX pairs the first half with the second
    expected = threefry_2x32((k0, k1), counts)
    y0, y1 = threefry2x32(k0, k1, counts[:4099], counts[4099:])
    np.testing.assert_array_equal(jnp.concatenate([y0, y1]), expected)


@pytest.mark.parametrize(
    "shape", [(1,), (7,), (3, 5, 7), pytest.param((64, 26, 26, 10), marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_random_bits_equal_jax_random_bits(shape, make_key):
    key = make_key(11)
    np.testing.assert_array_equal(random_bits(key, shape), jax.random.bits(key, shape, jnp.uint32))


def test_other_prng_implementations_are_accepted():
    key = jax.random.key(3, impl="rbg")
    x = jnp.ones((4096,))
    y = dropout(key, x, 0.5)
    assert 0.4 < float(jnp.mean(y == 0)) < 0.6


def test_threshold_gives_the_rate():
    assert drop_threshold(0.01) == round(0.01 * 2**32)
    assert drop_threshold(0.25) == 2**30
    assert drop_threshold(0.0) == 0


@pytest.mark.parametrize("rate", [0.01, 0.25, 0.5])
def test_dropped_fraction_and_scale(rate):
    x = jnp.full((256, 24, 24, 20), 3.0)  # model 8's largest activation: 2.9M elements
    y = jax.jit(dropout, static_argnums=2)(jax.random.key(0), x, rate)
    dropped = float(jnp.mean(y == 0))
    sigma = np.sqrt(rate * (1 - rate) / x.size)
    assert abs(dropped - rate) < 5 * sigma, (dropped, rate)
    kept = np.asarray(y[y != 0])
    np.testing.assert_allclose(kept, 3.0 / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 32, 70, 256])
def test_mask_is_the_thresholded_words(rows):
    # Row n of the input reads word (n // G, n % G, ...) of random_bits((32, G, ...)), G = ceil(rows / 32).
    x = jnp.arange(1, rows * 3 * 5 + 1, dtype=jnp.float32).reshape(rows, 3, 5)
    key = jax.random.key(5)
    groups = -(-rows // 32)
    words = np.asarray(random_bits(key, (32, groups, 3, 5)))
    n = np.arange(rows)
    expected_keep = words[n // groups, n % groups] >= drop_threshold(0.3)
    np.testing.assert_array_equal(np.asarray(dropout(key, x, 0.3)) != 0, expected_keep)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_neighbouring_elements_are_independent():
    # Pairs of horizontally adjacent elements: the four keep/drop combinations should
    # follow the product law (chi-square, 3 degrees of freedom, p < 1e-4 threshold 21.1).
    y = dropout(jax.random.key(9), jnp.ones((256, 24, 24, 20)), 0.25)
    keep = np.asarray(y != 0)
    a, b = keep[:, :, :-1, :].reshape(-1), keep[:, :, 1:, :].reshape(-1)
    p = keep.mean()
    counts = np.array([np.sum(a & b), np.sum(a & ~b), np.sum(~a & b), np.sum(~a & ~b)])
    expected = a.size * np.array([p * p, p * (1 - p), (1 - p) * p, (1 - p) * (1 - p)])
    assert np.sum((counts - expected) ** 2 / expected) < 21.1


def test_keys_give_different_masks_and_the_same_key_the_same():
    x = jnp.ones((10_000,))
    m1, m2 = dropout(jax.random.key(1), x, 0.5), dropout(jax.random.key(2), x, 0.5)
    assert float(jnp.mean(m1 == m2)) < 0.6
    np.testing.assert_array_equal(m1, dropout(jax.random.key(1), x, 0.5))


def test_edge_rates_and_gradient():
    x = jnp.arange(1.0, 65.0)
    np.testing.assert_array_equal(dropout(jax.random.key(0), x, 0.0), x)
    np.testing.assert_array_equal(dropout(jax.random.key(0), x, 1.0), jnp.zeros_like(x))
    grad = jax.grad(lambda v: jnp.sum(dropout(jax.random.key(4), v, 0.5)))(x)
    y = dropout(jax.random.key(4), x, 0.5)
    np.testing.assert_array_equal(grad, jnp.where(y != 0, 2.0, 0.0))


def test_module_uses_the_dropout_stream_and_is_identity_when_deterministic():
    x = jnp.ones((8, 100))
    module = Dropout(0.5)
    a = module.apply({}, x, rngs={"dropout": jax.random.key(0)})
    b = module.apply({}, x, rngs={"dropout": jax.random.key(1)})
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(Dropout(0.5, deterministic=True).apply({}, x), x)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        module.apply({}, x)
