"""A training run on disk: config, per-epoch metrics, orbax checkpoints, resume, NaN stop.

Layout of ``out_dir``:
- ``config.json``: the resolved recipe, seed, number of training examples, versions, device.
- ``metrics.jsonl``: one JSON object per finished epoch (``epoch`` 1-based, ``lr``,
  ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``epoch_seconds``;
  accuracies in percent).
- ``checkpoints/<epoch>/``: orbax checkpoints of the train state after each epoch
  (written to a temporary directory and renamed when complete, so only whole
  checkpoints are ever seen).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jax_mnist.data import Mnist
from jax_mnist.recipes import Recipe
from jax_mnist.train import Engine, TrainState, make_schedules, steps_per_epoch


class RunError(ValueError):
    """A run that cannot start or go on (bad arguments, a foreign --out, non-finite loss)."""


class NonFiniteLoss(RunError):
    pass


def _versions() -> dict[str, str]:
    import flax
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}  # fmt: skip


def _device() -> dict[str, object]:
    device = jax.devices()[0]
    return {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}


def run_identity(recipe: Recipe, seed: int, train_examples: int) -> dict:
    """What must match for a run directory to be resumed (everything that changes the numbers)."""
    return {"recipe": dataclasses.asdict(recipe), "seed": seed, "train_examples": train_examples}


def _checkpoint_manager(out_dir: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager((out_dir / "checkpoints").absolute(), options=options)


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def _write_lines_atomically(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


class _Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, epochs: int, steps_per_epoch: int):
        self.epochs, self.total = epochs, steps_per_epoch
        self.enabled = sys.stderr.isatty()
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        # One object for the whole run: the compiled epoch calls it, so it must not change.
        self.label, self.first, self.last = f"epoch {epoch + 1}/{self.epochs}", epoch * self.total, 0.0

    def __call__(self, step) -> None:
        done = int(step) - self.first
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.25 or done == self.total):
            self.last = now
            filled = 30 * done // self.total
            print(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)


def train(
    recipe: Recipe,
    data: Mnist,
    out_dir: str | os.PathLike,
    *,
    seed: int = 1,
    resume: bool = False,
    train_examples: int | None = None,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``recipe`` for its epochs, writing config, metrics and checkpoints to ``out_dir``.

    Returns the metrics of every epoch (including those of a resumed run's earlier part).
    """
    num_train = data.train_labels.shape[0]
    train_examples = num_train if train_examples is None else train_examples
    if not 1 <= train_examples <= num_train:
        raise RunError(f"--train-examples must be between 1 and {num_train}, found {train_examples}")
    if recipe.batch_size > train_examples:
        raise RunError(f"batch size {recipe.batch_size} is larger than the {train_examples} training examples")

    out = Path(out_dir)
    identity = run_identity(recipe, seed, train_examples)
    config_path = out / "config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if {k: previous.get(k) for k in identity} != identity:
            raise RunError(f"{out} holds a different run (recipe {previous.get('recipe', {}).get('name')!r}, "
                           f"seed {previous.get('seed')}); refusing to overwrite it: choose another --out")  # fmt: skip
        if not resume:
            raise RunError(f"{out} already holds this run; pass --resume to continue it, or choose another --out")
    elif resume and out.exists() and any(out.iterdir()):
        raise RunError(f"{out} has no config.json: nothing to resume")
    out.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        config = {**identity, "versions": _versions(), "device": _device()}
        config_path.write_text(json.dumps(config, indent=2) + "\n")

    engine = Engine.from_recipe(recipe, train_examples)
    run_key = jax.random.key(seed)
    state = engine.init(jax.random.fold_in(run_key, 0))
    step_key = jax.random.fold_in(run_key, 2)
    per_epoch = steps_per_epoch(train_examples, recipe.batch_size)
    lr_schedule, _ = make_schedules(recipe, per_epoch)

    manager = _checkpoint_manager(out)
    start_epoch = 0
    metrics_path = out / "metrics.jsonl"
    if resume and manager.latest_step() is not None:
        start_epoch = manager.latest_step()
        state = restore_state(manager, start_epoch, state)
        log(f"resumed from the checkpoint of epoch {start_epoch} in {out / 'checkpoints'}")
    history = _read_metrics(metrics_path, start_epoch)
    _write_lines_atomically(metrics_path, history)  # drop lines of an epoch whose checkpoint never completed

    train_images = jax.device_put(data.train_images[:train_examples])
    train_labels = jax.device_put(data.train_labels[:train_examples])
    test_images, test_labels = jax.device_put(data.test_images), jax.device_put(data.test_labels)

    progress = _Progress(recipe.epochs, per_epoch)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        lr = float(lr_schedule(epoch * per_epoch))
        progress.start_epoch(epoch)
        # The bar is a host callback inside the compiled epoch, and XLA's persistent cache does not
        # store programs with host callbacks: only pay for it where someone watches a terminal.
        state, sums = engine.train_epoch(state, train_images, train_labels, step_key, epoch,
                                         progress=progress if progress.enabled else None)  # fmt: skip
        train_loss = float(sums["loss_sum"]) / int(sums["count"])
        progress.close()
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(
                f"epoch {epoch + 1}: training loss is {train_loss}; run stopped. The last good checkpoint "
                f"(epoch {manager.latest_step() or 'none'}) is kept in {out / 'checkpoints'}"
            )
        test = engine.evaluate(state, test_images, test_labels)
        row = {
            "epoch": epoch + 1,
            "lr": float(str(np.float32(lr))),  # the float32 LR used, in its shortest decimal form
            "train_loss": train_loss,
            "train_accuracy": 100.0 * int(sums["correct"]) / int(sums["count"]),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "epoch_seconds": round(time.perf_counter() - started, 3),
        }
        history.append(row)
        _write_lines_atomically(metrics_path, history)
        save_state(manager, epoch + 1, state)
        log(f"epoch {row['epoch']:>2}/{recipe.epochs}  lr {lr:.5f}  train loss {train_loss:.4f} "
            f"acc {row['train_accuracy']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2f}%  "
            f"{row['epoch_seconds']:.1f} s")  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(row)
    manager.close()
    return history


def save_state(manager, epoch: int, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    manager.save(epoch, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_state(manager, epoch: int, like: TrainState) -> TrainState:
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
