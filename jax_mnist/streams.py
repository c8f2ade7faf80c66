"""A run's random streams: one key per consumer, derived so that no two consumers share a key.

``run_keys(seed)`` splits ``key(seed)`` three ways into named streams:

- ``init``: the model's initial parameters (used once);
- ``shuffle``: epoch ``e`` shuffles with ``fold_in(shuffle, e)``;
- ``step``: optimizer step ``t`` (counted over the whole run) draws
  ``split(fold_in(step, t))`` = (augmentation key, dropout key).

Every key a run consumes is a function of (seed, epoch or step) only, so a resumed run
replays exactly and seed ``s`` of a multi-seed run draws what the single-seed run of ``s``
draws. (The earlier scheme folded small integers into one key at two depths, and since
``split(k) == [fold_in(k, 0), fold_in(k, 1)]`` epoch 0's shuffle key was step 1's
augmentation key; ``tests/test_streams.py`` checks that no key is consumed twice.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RunKeys(NamedTuple):
    init: jax.Array
    shuffle: jax.Array
    step: jax.Array


def run_keys(seed: int) -> RunKeys:
    init, shuffle, step = jax.random.split(jax.random.key(seed), 3)
    return RunKeys(init, shuffle, step)


def stacked_run_keys(seeds) -> RunKeys:
    """``run_keys`` of each seed, stacked on a leading seed axis (each seed's keys as on its own)."""
    per_seed = [run_keys(s) for s in seeds]
    return RunKeys(*(jnp.stack(keys) for keys in zip(*per_seed)))


def shuffle_key(shuffle_stream: jax.Array, epoch) -> jax.Array:
    return jax.random.fold_in(shuffle_stream, epoch)


def step_keys(step_stream: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, dropout key) of optimizer step ``step``."""
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(step_stream, step))
    return augment_key, dropout_key
