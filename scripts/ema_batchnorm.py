"""Which BatchNorm statistics go with a run's averaged weights (recipe field ``ema``), measured.

For a finished screening run with ``ema`` > 0 (it holds a validation split), scores on that split:
1. the averaged weights with the averaged running statistics (what the run records and keeps);
2. the averaged weights with statistics recomputed on a fixed set of training images (the first
   N kept training examples, not augmented: one train-mode pass, each layer's batch statistics);
3. the weights being trained, with their own running statistics (no average), for reference.
Read only: the run directory is not changed.

Usage: python scripts/ema_batchnorm.py RUN_DIR [--images 10000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jax_mnist import engine
from jax_mnist.checkpoints import CheckpointStore
from jax_mnist.data import load_mnist, split_validation
from jax_mnist.rundir import load_run, read_run

MOMENTUM = 0.1  # jax_mnist.layers.BatchNorm's (PyTorch's convention)


def recomputed_statistics(model, params, batch_stats, images_uint8):
    """Each BatchNorm's statistics over ``images_uint8`` in one train-mode pass (as PyTorch's
    running update with momentum 1 would give them), from the running update's algebra."""
    images = engine.normalize(engine.preprocess(jnp.asarray(images_uint8)))
    _, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    return jax.tree_util.tree_map(
        lambda new, old: (new - (1 - MOMENTUM) * old) / MOMENTUM, updates["batch_stats"], batch_stats
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    record = read_run(args.run_dir)
    recipe = record.recipe
    if recipe.ema <= 0 or recipe.validation <= 0:
        raise SystemExit(f"{args.run_dir}: needs a run with ema > 0 and a validation split")
    data = load_mnist(download=False)
    (train_images, _), held_out = split_validation(data.train_images, data.train_labels, recipe.validation)
    programs = engine.programs_for(engine.ProgramConfig(recipe, record.train_examples))
    model = programs.model
    averaged = load_run(args.run_dir).state
    store = CheckpointStore(Path(args.run_dir))
    try:
        epoch = max(store.epochs())
        like = jax.eval_shape(programs.init_state, jax.random.key(0))
        full, _ = store.restore_state(
            epoch, like, json.loads((Path(args.run_dir) / "config.json").read_text())
        )
    finally:
        store.close()

    def accuracy(params, batch_stats) -> float:
        stacked = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], (params, batch_stats))
        sums = programs.evaluate(*stacked, *held_out)
        return engine.means(jax.device_get(engine.seed_slice(sums, 0)))["accuracy"]

    fresh = recomputed_statistics(model, averaged.params, averaged.batch_stats, train_images[: args.images])
    rows = {
        "averaged weights, averaged statistics (recorded)": accuracy(averaged.params, averaged.batch_stats),
        f"averaged weights, statistics of {args.images:,} training images": accuracy(averaged.params, fresh),
        "trained weights, their running statistics": accuracy(full.params, full.batch_stats),
    }
    print(
        f"{args.run_dir}, epoch {epoch}, validation accuracy over {held_out[1].shape[0]:,} held-out examples:"
    )
    for name, value in rows.items():
        print(f"  {value:6.2f} %  {name}")


if __name__ == "__main__":
    main()
