"""A training run on disk: config, per-epoch metrics, orbax checkpoints, resume, NaN stop.

``train`` runs one seed into ``out_dir``; ``train_seeds`` runs several seeds in one compiled
program, each into its own directory (``seed_dirs``: ``<out>/seed-<s>``) with exactly the
files a single-seed run of it writes.

Layout of a run directory:
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
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from jax_mnist.data import Mnist
from jax_mnist.recipes import Recipe
from jax_mnist.engine import Engine, TrainState, seed_slice, stack_seeds, steps_per_epoch
from jax_mnist.errors import JaxMnistError


class RunError(JaxMnistError, ValueError):
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
    """A one-line status and progress bar on a terminal (stderr), updated from Python between the
    compiled chunks of an epoch: steps, images/s, time left in the epoch, running loss. Silent
    when stderr is not a terminal (logs keep only the per-epoch lines)."""

    def __init__(self, epochs: int, steps_per_epoch: int, images_per_step: int, enabled: bool | None = None):
        self.epochs, self.total, self.images_per_step = epochs, steps_per_epoch, images_per_step
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.label, self.started = "", time.monotonic()

    def _show(self, text: str) -> None:
        if self.enabled:
            print("\r\033[K" + text, end="", file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, first_in_process: bool) -> None:
        self.label, self.started = f"epoch {epoch + 1}/{self.epochs}", time.monotonic()
        doing = "compiling the training step (once per process), then training" if first_in_process else "training"
        self._show(f"{self.label}: {doing}")

    def status(self, text: str) -> None:
        self._show(f"{self.label}: {text}")

    def __call__(self, steps_done: int, totals: dict) -> None:
        elapsed = time.monotonic() - self.started
        rate = steps_done / elapsed if elapsed > 0 else 0.0
        left = (self.total - steps_done) / rate if rate else float("nan")
        loss = float(np.sum(totals["loss_sum"]) / max(int(np.sum(totals["count"])), 1))
        filled = 30 * steps_done // self.total
        self._show(f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {steps_done}/{self.total} steps, "
                   f"{rate * self.images_per_step:,.0f} images/s, {left:.0f} s left, loss {loss:.4f}")  # fmt: skip

    def close(self) -> None:
        self._show("")


@dataclasses.dataclass
class _SeedRun:
    """One seed's run directory and what has been recorded in it."""

    seed: int
    out: Path
    manager: object
    history: list[dict]
    start_epoch: int


def _open_run(recipe: Recipe, seed: int, out: Path, train_examples: int, resume: bool) -> tuple[Path, dict]:
    """Check that ``out`` can hold (or continue) this run; returns its config path and identity."""
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
    return config_path, identity


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
    hook = None if on_epoch_end is None else (lambda seed, row: on_epoch_end(row))
    histories = train_seeds(recipe, data, {seed: out_dir}, resume=resume, train_examples=train_examples,
                            log=log, on_epoch_end=hook)  # fmt: skip
    return histories[seed]


def seed_dirs(out_dir: str | os.PathLike, seeds: Sequence[int]) -> dict[int, Path]:
    """The run directory of each seed of a multi-seed run: ``<out_dir>/seed-<s>``."""
    return {s: Path(out_dir) / f"seed-{s}" for s in seeds}


def train_seeds(
    recipe: Recipe,
    data: Mnist,
    run_dirs: Mapping[int, str | os.PathLike],
    *,
    resume: bool = False,
    train_examples: int | None = None,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    progress: bool | None = None,
) -> dict[int, list[dict]]:
    """Train ``recipe`` for every seed in ``run_dirs`` (seed -> run directory) in one compiled program.

    Each directory receives exactly what a single-seed ``train`` of that seed writes. With
    ``resume``, finished seeds are skipped and the others continue from their last checkpoint
    (seeds that stopped at different epochs are continued in groups, one group per epoch).
    Returns each seed's metrics of every epoch. ``progress``: show the bar (default: on a terminal).
    """
    num_train = data.train_labels.shape[0]
    train_examples = num_train if train_examples is None else train_examples
    if not run_dirs:
        raise RunError("no seeds to train")
    if not 1 <= train_examples <= num_train:
        raise RunError(f"--train-examples must be between 1 and {num_train}, found {train_examples}")
    if recipe.batch_size > train_examples:
        raise RunError(f"batch size {recipe.batch_size} is larger than the {train_examples} training examples")

    runs = []
    for seed, out_dir in run_dirs.items():
        out = Path(out_dir)
        config_path, identity = _open_run(recipe, seed, out, train_examples, resume)
        if not config_path.exists():
            config = {**identity, "versions": _versions(), "device": _device()}
            try:
                out.mkdir(parents=True, exist_ok=True)
                config_path.write_text(json.dumps(config, indent=2) + "\n")
            except OSError as e:
                raise RunError(f"{out}: cannot write the run directory ({e.strerror})") from None
        manager = _checkpoint_manager(out)
        start = manager.latest_step() if resume and manager.latest_step() is not None else 0
        history = _read_metrics(out / "metrics.jsonl", start)
        _write_lines_atomically(out / "metrics.jsonl", history)  # drop lines of an epoch whose checkpoint never completed
        runs.append(_SeedRun(seed, out, manager, history, start))

    engine = Engine.from_recipe(recipe, train_examples)
    train_set = engine.put_shared((data.train_images[:train_examples], data.train_labels[:train_examples]))
    test_set = engine.put_shared((data.test_images, data.test_labels))
    groups: dict[int, list[_SeedRun]] = {}
    for run in runs:
        if run.start_epoch >= recipe.epochs:
            log(f"seed {run.seed}: all {recipe.epochs} epochs are done in {run.out}")
        else:
            groups.setdefault(run.start_epoch, []).append(run)
    try:
        for start_epoch, group in sorted(groups.items()):
            _train_group(engine, recipe, group, start_epoch, train_set, test_set, log, on_epoch_end, progress,
                         name_seeds=len(runs) > 1)
    finally:
        for run in runs:
            run.manager.close()
    return {run.seed: run.history for run in runs}


def _train_group(engine: Engine, recipe: Recipe, group: list[_SeedRun], start_epoch: int, train_set, test_set,
                 log, on_epoch_end, progress_enabled, name_seeds: bool) -> None:  # fmt: skip
    """Epochs ``start_epoch`` .. of the seeds in ``group``, stacked on one seed axis."""
    seeds = [run.seed for run in group]
    states, keys = engine.init_seeds(seeds)
    if start_epoch:
        restored = [restore_state(run.manager, start_epoch, seed_slice(states, k)) for k, run in enumerate(group)]
        states = engine.put_seeds(stack_seeds(restored))
        for run in group:
            log(f"seed {run.seed}: resumed from the checkpoint of epoch {start_epoch} in {run.out / 'checkpoints'}")
    train_examples = train_set[1].shape[0]
    per_epoch = steps_per_epoch(train_examples, recipe.batch_size)
    bar = _Progress(recipe.epochs, per_epoch, recipe.batch_size * len(seeds), progress_enabled)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        lr = engine.learning_rate(epoch * per_epoch)
        bar.start_epoch(epoch, first_in_process=epoch == start_epoch)
        states, sums = engine.train_epoch(states, *train_set, keys, epoch, progress=bar)
        train_losses = sums["loss_sum"] / sums["count"]
        bad = [(s, float(loss)) for s, loss in zip(seeds, train_losses) if not math.isfinite(loss)]
        if bad:
            bar.close()
            which = "" if len(seeds) == 1 else " for seed " + ", ".join(str(s) for s, _ in bad)
            kept = ", ".join(f"{run.out / 'checkpoints'} (epoch {run.manager.latest_step() or 'none'})" for run in group)
            raise NonFiniteLoss(f"epoch {epoch + 1}: training loss is {bad[0][1]}{which}; run stopped. "
                                f"The last good checkpoints are kept: {kept}")  # fmt: skip
        bar.status(f"evaluating {len(seeds)} seed(s) on {test_set[1].shape[0]:,} test images")
        tests = engine.evaluate_seeds(states, *test_set)
        epoch_seconds = round(time.perf_counter() - started, 3)
        bar.status("saving checkpoints")
        for k, run in enumerate(group):
            row = {
                "epoch": epoch + 1,
                "lr": float(str(np.float32(lr))),  # the float32 LR used, in its shortest decimal form
                "train_loss": float(train_losses[k]),
                "train_accuracy": 100.0 * int(sums["correct"][k]) / int(sums["count"][k]),
                "test_loss": tests[k]["loss"],
                "test_accuracy": tests[k]["accuracy"],
                "epoch_seconds": epoch_seconds,
            }
            run.history.append(row)
            _write_lines_atomically(run.out / "metrics.jsonl", run.history)
            save_state(run.manager, epoch + 1, seed_slice(states, k))
            bar.close()
            log(f"epoch {row['epoch']:>2}/{recipe.epochs}{f' seed {run.seed}' if name_seeds else ''}  lr {lr:.5f}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2f}%  "
                f"{row['epoch_seconds']:.1f} s")  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(run.seed, row)
    bar.close()


def save_state(manager, epoch: int, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    manager.save(epoch, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_state(manager, epoch: int, like: TrainState) -> TrainState:
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
