"""Weight averaging (recipe field ``ema``) and augmentation that stops for the last epochs
(``augment_off_epochs``): the compiled step, the checkpoints, resume and the readers of a run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist import engine
from jax_mnist.checkpoints import CheckpointStore
from jax_mnist.errors import ConfigError
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.run import train
from jax_mnist.rundir import load_run
from tests.helpers import SUBSET, numbers, small_recipe

SYNTHETIC = 64


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (SYNTHETIC, 28, 28, 1), dtype=np.uint8)
    return jnp.asarray(images), jnp.asarray(rng.integers(0, 10, SYNTHETIC).astype(np.int32))


def _step_and_state(recipe, ema: bool, **step_options):
    model, tx = engine.make_model(recipe, "cpu"), engine.make_optimizer(recipe, 10)
    step = jax.jit(
        functools.partial(engine.train_step, model, tx, engine.make_augment(recipe), **step_options)
    )
    return step, engine.init_state(model, tx, jax.random.key(0), ema=ema)


def test_recipe_fields_are_checked():
    with pytest.raises(ConfigError, match=r"ema must be a finite number in \[0, 1\), found 1.0"):
        with_overrides(get_recipe("ours_5k"), {"ema": "1"})
    with pytest.raises(ConfigError, match="augment_off_epochs must be <= epochs"):
        with_overrides(get_recipe("ours_5k"), {"augment_off_epochs": 16})
    assert get_recipe("ours_5k").ema == 0.0 and get_recipe("ours_5k").augment_off_epochs == 0


def test_a_state_without_an_average_has_the_leaves_it_had():
    recipe = get_recipe("ours_2k")
    model, tx = engine.make_model(recipe, "cpu"), engine.make_optimizer(recipe, 10)
    plain = jax.eval_shape(lambda k: engine.init_state(model, tx, k), jax.random.key(0))
    averaged = jax.eval_shape(lambda k: engine.init_state(model, tx, k, ema=True), jax.random.key(0))
    old_fields = (plain.step, plain.params, plain.batch_stats, plain.opt_state)
    assert plain.ema is None
    assert len(jax.tree_util.tree_leaves(plain)) == len(jax.tree_util.tree_leaves(old_fields))
    params_and_stats = {"params": plain.params, "batch_stats": plain.batch_stats}
    assert jax.tree_util.tree_structure(averaged.ema) == jax.tree_util.tree_structure(params_and_stats)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_the_average_equals_a_numpy_recomputation_and_leaves_training_alone():
    decay = 0.8
    recipe = with_overrides(get_recipe("ours_2k"), {"ema": decay})
    averaging, state = _step_and_state(recipe, ema=True, ema_decay=decay)
    plain, plain_state = _step_and_state(recipe, ema=False)
    as_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
    expected = as_numpy({"params": state.params, "batch_stats": state.batch_stats})
    for k in range(4):
        images, labels = _batch(k)
        state, _ = averaging(state, images, labels, jax.random.key(k))
        plain_state, _ = plain(plain_state, images, labels, jax.random.key(k))
        trained = as_numpy({"params": state.params, "batch_stats": state.batch_stats})
        expected = jax.tree_util.tree_map(lambda a, w: decay * a + (1 - decay) * w, expected, trained)
        jax.tree_util.tree_map(
            functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), as_numpy(state.ema), expected
        )
    # The average is a side computation: the weights trained are those of the run without it.
    for field in ("step", "params", "batch_stats", "opt_state"):
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            as_numpy(getattr(state, field)),
            as_numpy(getattr(plain_state, field)),
        )
    assert not np.allclose(
        state.ema["params"]["head"]["conv"]["kernel"], state.params["head"]["conv"]["kernel"]
    )


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_augmentation_stops_at_its_step():
    recipe = with_overrides(get_recipe("ours_2k"), {"degrees": 30.0, "translate": 0.2})
    faded, state = _step_and_state(recipe, ema=False, augment_steps=3)
    always, _ = _step_and_state(recipe, ema=False)
    never, _ = _step_and_state(with_overrides(recipe, {"augment": "none"}), ema=False)
    images, labels = _batch()
    as_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
    # Inside lax.cond XLA fuses the step otherwise: the same computation to rounding (1e-10 here),
    # against differences of 1e-4 and more between augmented and plain images.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-8)
    for step, reference, other in ((2, always, never), (3, never, always)):
        at = state.replace(step=jnp.asarray(step, jnp.int32))
        got = as_numpy(faded(at, images, labels, jax.random.key(7))[0].params)
        jax.tree_util.tree_map(
            close, got, as_numpy(reference(at, images, labels, jax.random.key(7))[0].params)
        )
        differs = as_numpy(other(at, images, labels, jax.random.key(7))[0].params)
        with pytest.raises(AssertionError):
            close(got["head"]["conv"]["kernel"], differs["head"]["conv"]["kernel"])


def _checkpoint_state(out, epoch, recipe, programs_like):
    store = CheckpointStore(out)
    try:
        import json

        config = json.loads((out / "config.json").read_text())
        return store.restore_state(epoch, programs_like, config)[0]
    finally:
        store.close()


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_an_averaged_run_resumes_bitwise_and_is_read_with_its_average(mnist, tmp_path):
    recipe = small_recipe(ema=0.9, augment_off_epochs=1)
    quiet = lambda s: None
    straight = train(recipe, mnist, tmp_path / "straight", seed=1, train_examples=SUBSET, log=quiet)

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            recipe,
            mnist,
            tmp_path / "cut",
            seed=1,
            train_examples=SUBSET,
            log=quiet,
            on_epoch_end=stop_after_one,
        )
    resumed = train(recipe, mnist, tmp_path / "cut", seed=1, train_examples=SUBSET, resume=True, log=quiet)
    assert numbers(resumed) == numbers(straight)

    programs = engine.programs_for(engine.ProgramConfig(recipe, SUBSET))
    like = jax.eval_shape(programs.init_state, jax.random.key(0))
    states = [_checkpoint_state(tmp_path / name, 3, recipe, like) for name in ("straight", "cut")]
    as_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
    jax.tree_util.tree_map(np.testing.assert_array_equal, as_numpy(states[0]), as_numpy(states[1]))
    # Readers of the run (evaluate, predict, export: load_run) get the average, not the trained weights.
    read = load_run(tmp_path / "straight").state
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, as_numpy(read.params), as_numpy(states[0].ema["params"])
    )
    head = lambda params: params["convblock8"]["conv"]["kernel"]  # model 8's 1x1 head
    assert not np.array_equal(head(read.params), head(states[0].params))
    # The recorded score is the average's: evaluating the weights read back gives it again.
    sums = programs.evaluate(
        *jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], (read.params, read.batch_stats)),
        mnist.test_images,
        mnist.test_labels,
    )
    accuracy = engine.means(jax.device_get(engine.seed_slice(sums, 0)))["accuracy"]
    assert accuracy == straight[-1]["test_accuracy"]
