"""Dropout whose random bits XLA can fuse: Threefry-2x32 written out as plain arithmetic.

``flax.linen.Dropout`` draws its mask with ``jax.random.bernoulli``; on XLA:CPU JAX
lowers Threefry as a rolled loop over materialised counter arrays (to keep compile
times down), which made dropout's random bits about a third of model 8's training
step and most of its compile time (docs/benchmarks.md). Here the same generator,
Threefry-2x32 with 20 rounds, is written as plain uint32 arithmetic on ``iota``s,
so XLA fuses counters, hash and threshold into one loop, and the mask is packed
to one bit per element (``keep_mask``) so that loop runs once per layer.

``random_bits`` equals ``jax.random.bits(key, shape, jnp.uint32)`` (tested); an
element is dropped when its word is below ``round(rate * 2**32)``, i.e. with
probability ``rate`` to within 2**-32. ``scripts/profile_step.py`` times model 8's
step with this dropout and with ``flax.linen.Dropout`` (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32 rotation constants (Salmon et al. 2011), alternating every four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under key (k0, k1), unrolled."""
    keys = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + keys[(group + 1) % 3]
        x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 words of a threefry key; other PRNG implementations are hashed down to two."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key  # a raw uint32 key is already its data
    if data.shape == (2,):
        return data[0], data[1]
    words = jax.random.bits(key, (2,), jnp.uint32)
    return words[0], words[1]


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 words of ``shape``, equal to ``jax.random.bits(key, shape)`` for a threefry key
    (JAX's partitionable layout: element i hashes the counter pair (0, i), words xor-ed)."""
    if math.prod(shape) >= 2**32:
        raise ValueError(f"random_bits counts elements in 32 bits: shape {shape} is too large")
    k0, k1 = key_words(key)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):  # the row-major flat index, built from fusible iotas
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    y0, y1 = threefry2x32(k0, k1, jnp.zeros(shape, jnp.uint32), index)
    return y0 ^ y1


def drop_threshold(rate: float) -> np.uint32:
    """The 32-bit word below which an element is dropped."""
    return np.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep-mask of ``shape``: element (n, ...) is kept when word (n // G, n % G, ...)
    of ``random_bits(key, (32, G, ...))`` is at least ``drop_threshold(rate)``, G = ceil(N / 32).

    The mask is packed 32 rows to a word along the leading axis by a reduction. XLA
    computes a reduction once and stores it (here 1 bit per element, kept for the
    backward pass); an elementwise mask would be copied, 20 hash rounds and all,
    into every fusion that reads it (up to nine per layer in the im2col
    convolutions). Packing along the leading axis keeps the unpacking per element
    to a shift: the word index and bit depend on the row only.
    """
    rows, rest = shape[0], tuple(shape[1:])
    groups = -(-rows // 32)
    keep = random_bits(key, (32, groups, *rest)) >= drop_threshold(rate)
    bit = jax.lax.broadcasted_iota(jnp.uint32, keep.shape, 0)
    packed = jnp.sum(jnp.where(keep, np.uint32(1) << bit, np.uint32(0)), axis=0, dtype=jnp.uint32)
    row = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    words = jnp.tile(packed, (32,) + (1,) * len(rest))[:rows]  # row n reads word n % G
    return ((words >> (row // np.uint32(groups))) & np.uint32(1)) == 1


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Zero each element of ``x`` with probability ``rate``, scale the rest by 1 / (1 - rate)."""
    if rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    shape = x.shape if x.ndim else (1,)
    keep = keep_mask(key, shape, rate).reshape(x.shape)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0).astype(x.dtype)


class Dropout(nn.Module):
    """``flax.linen.Dropout``'s interface (rate, ``deterministic``, rng stream "dropout") over ``dropout``."""

    rate: float
    deterministic: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        return dropout(self.make_rng("dropout"), x, self.rate)
