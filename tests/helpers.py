"""Shared by the training tests: a small but real configuration and ways to compare runs."""

import jax
import numpy as np

from jax_mnist.engine import Engine
from jax_mnist.recipes import get_recipe, with_overrides

# Model 8 with dropout, StepLR, rotation, 1,000 examples.
SUBSET = 1000
SMALL = {"epochs": 3, "batch_size": 128, "step_size": 2}
EPOCH_KEYS = ["epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds"]


def small_recipe(**extra):
    return with_overrides(get_recipe("final"), {**SMALL, **extra})


def numbers(history):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


def final_params(out):
    """The train state of ``out``'s last checkpoint, as numpy arrays."""
    from jax_mnist.run import _checkpoint_manager, restore_state

    manager = _checkpoint_manager(out)
    like = Engine.from_recipe(small_recipe(), SUBSET).init(jax.random.key(0))
    state = restore_state(manager, manager.latest_step(), like)
    manager.close()
    return jax.tree_util.tree_map(np.asarray, state)
