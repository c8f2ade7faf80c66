"""No two consumers of randomness in a run ever receive the same key."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.engine import ProgramConfig, programs_for
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.streams import run_keys, shuffle_key, stacked_run_keys, step_keys

EPOCHS, STEPS_PER_EPOCH = 4, 12


def consumed_keys(seed: int) -> list[tuple[str, tuple[int, ...]]]:
    """(consumer, key words) of every key a run of EPOCHS x STEPS_PER_EPOCH steps consumes."""
    keys = run_keys(seed)
    consumed = [("init", keys.init)]
    consumed += [(f"shuffle epoch {e}", shuffle_key(keys.shuffle, e)) for e in range(EPOCHS)]
    for step in range(EPOCHS * STEPS_PER_EPOCH):
        augment, dropout = step_keys(keys.step, step)
        consumed += [(f"augment step {step}", augment), (f"dropout step {step}", dropout)]
    return [(name, tuple(np.asarray(jax.random.key_data(k)).tolist())) for name, k in consumed]


def repeated(consumed) -> list[tuple[str, str]]:
    first_user: dict = {}
    clashes = []
    for name, words in consumed:
        if words in first_user:
            clashes.append((first_user[words], name))
        first_user.setdefault(words, name)
    return clashes


def test_every_key_of_a_run_is_used_once():
    assert repeated(consumed_keys(1)) == []
    assert repeated(consumed_keys(1) + consumed_keys(2)) == []  # and seeds share none


def test_the_check_catches_the_old_derivation():
    """The derivation before streams.py (fold_in at two depths) reused keys; the check must see it."""
    run_key = jax.random.key(1)
    step_key = jax.random.fold_in(run_key, 2)
    consumed = [("init", jax.random.fold_in(run_key, 0))]
    consumed += [
        (f"shuffle epoch {e}", jax.random.fold_in(jax.random.fold_in(step_key, 1), e)) for e in range(EPOCHS)
    ]
    for step in range(EPOCHS * STEPS_PER_EPOCH):
        augment, dropout = jax.random.split(jax.random.fold_in(step_key, step))
        consumed += [(f"augment step {step}", augment), (f"dropout step {step}", dropout)]
    clashes = repeated([(n, tuple(np.asarray(jax.random.key_data(k)).tolist())) for n, k in consumed])
    assert ("shuffle epoch 0", "augment step 1") in clashes


def test_stacked_keys_are_each_seeds_own():
    stacked = stacked_run_keys([3, 8])
    for index, seed in enumerate([3, 8]):
        for field in ("init", "shuffle", "step"):
            np.testing.assert_array_equal(
                jax.random.key_data(getattr(stacked, field)[index]),
                jax.random.key_data(getattr(run_keys(seed), field)),
            )


def test_engine_shuffles_with_the_epoch_key():
    programs = programs_for(
        ProgramConfig(with_overrides(get_recipe("model_3_lighter_model"), {"batch_size": 10}), 50, 2)
    )
    keys = programs.place_states(stacked_run_keys([5, 6]))  # the keys init_seeds places
    orders = programs.shuffle(keys.shuffle, jnp.asarray(2, jnp.int32))
    for index, seed in enumerate([5, 6]):
        expected = jax.random.permutation(shuffle_key(run_keys(seed).shuffle, 2), 50)
        np.testing.assert_array_equal(orders[index], expected)
