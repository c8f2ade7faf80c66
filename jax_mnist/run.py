"""A training run on disk: config, per-epoch metrics, orbax checkpoints, resume, NaN stop.

``train`` runs one seed into ``out_dir``; ``train_seeds`` runs several seeds in one compiled
program, each into its own directory (``seed_dirs``: ``<out>/seed-<s>``) with exactly the
files a single-seed run of it writes.

A run directory (``jax_mnist.rundir`` checks, locks and verifies it) holds ``config.json``,
``metrics.jsonl`` (one JSON object per finished epoch: ``epoch`` 1-based, ``lr``,
``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``epoch_seconds``;
accuracies in percent), the orbax checkpoints of the last two epochs and of the best one,
and their digests.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from jax_mnist import hosts
from jax_mnist.data import Mnist
from jax_mnist.engine import Engine, seed_slice, steps_per_epoch
from jax_mnist.recipes import Recipe
from jax_mnist.rundir import RunDir, RunError, check_run_dir, run_identity


def load_run(out_dir, checkpoint="last"):
    """Deprecated here: ``jax_mnist.rundir.load_run`` is the one place (this alias stays for
    callers of the README's earlier ``jax_mnist.run.load_run``)."""
    import warnings

    from jax_mnist import rundir

    warnings.warn("jax_mnist.run.load_run is deprecated: use jax_mnist.rundir.load_run", DeprecationWarning, stacklevel=2)
    return rundir.load_run(out_dir, checkpoint)


class NonFiniteLoss(RunError):
    pass


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


MAX_SEED = 2**63 - 1  # jax.random.key takes a 64-bit seed


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
    ``resume``, finished seeds are skipped and the others continue from their last good checkpoint
    (seeds that stopped at different epochs are continued in groups, one group per epoch).
    Every directory is checked before anything is written in any of them.
    Returns each seed's metrics of every epoch. ``progress``: show the bar (default: on a terminal).
    """
    num_train = data.train_labels.shape[0]
    train_examples = num_train if train_examples is None else train_examples
    if not run_dirs:
        raise RunError("no seeds to train")
    bad_seeds = [s for s in run_dirs if not (isinstance(s, int) and 0 <= s <= MAX_SEED)]
    if bad_seeds:
        raise RunError(f"seeds must be whole numbers from 0 to 2**63 - 1, found {bad_seeds[0]}")
    if not 1 <= train_examples <= num_train:
        raise RunError(f"--train-examples must be between 1 and {num_train}, found {train_examples}")
    if recipe.batch_size > train_examples:
        raise RunError(f"batch size {recipe.batch_size} is larger than the {train_examples} training examples")
    if not hosts.is_main():  # process 0 of a multi-process run prints, and alone reads and writes the runs
        log, progress = (lambda message: None), False
    engine = Engine.from_recipe(recipe, train_examples)
    with contextlib.ExitStack() as stack:
        runs = _shared_runs(lambda: _open_runs(stack, engine, recipe, run_dirs, resume, train_examples, log), run_dirs)
        train_set = engine.put_shared((data.train_images[:train_examples], data.train_labels[:train_examples]))
        test_set = engine.put_shared((data.test_images, data.test_labels))
        groups: dict[int, list[RunDir]] = {}
        for run in runs:
            if run.start_epoch >= recipe.epochs:
                log(f"seed {run.seed}: all {recipe.epochs} epochs are done in {run.out}")
            else:
                groups.setdefault(run.start_epoch, []).append(run)
        try:
            for start_epoch, group in sorted(groups.items()):
                _train_group(engine, recipe, group, start_epoch, train_set, test_set, log, on_epoch_end, progress,
                             name_seeds=len(runs) > 1)  # fmt: skip
        except Exception as e:  # noqa: BLE001  (the runtime raises its own types when a peer is gone)
            if not hosts.peer_lost(e):
                raise
            raise PeerLost(f"{hosts.describe()}: another process of this run stopped ({str(e).splitlines()[0][:200]}). "
                           f"Every finished epoch is checkpointed: start all {hosts.count()} processes again "
                           "with --resume") from None  # fmt: skip
    return {run.seed: run.history for run in runs}


class PeerLost(RunError):
    """Another process of a multi-process run stopped (killed, crashed, or its host went away)."""


def _open_runs(stack: contextlib.ExitStack, engine: Engine, recipe: Recipe, run_dirs: Mapping[int, str | os.PathLike],
               resume: bool, train_examples: int, log) -> list[RunDir]:
    """Every run directory checked, then each opened (locked, restored) for the life of ``stack``."""
    plans = {seed: (Path(out), run_identity(recipe, seed, train_examples)) for seed, out in run_dirs.items()}
    started = {seed for seed, (out, _) in plans.items() if out.is_dir() and any(p.name != ".lock" for p in out.iterdir())}
    if resume and len(plans) > 1 and not started:
        raise RunError(f"none of the run directories exists yet ({', '.join(str(out) for out, _ in plans.values())}): "
                       "nothing to resume (drop --resume to start the runs)")
    # With --resume, seeds of a multi-seed run that have not started yet start now.
    previous = {seed: check_run_dir(out, identity, resume and (seed in started or len(plans) == 1), recipe.schedule)
                for seed, (out, identity) in plans.items()}
    # The state's structure, to restore checkpoints into: traced only when something is resumed.
    like = jax.eval_shape(engine.init, jax.random.key(0)) if any(p is not None for p in previous.values()) else None
    return [stack.enter_context(RunDir.open(seed, out, identity, previous[seed], like, log))
            for seed, (out, identity) in plans.items()]


def _shared_runs(open_runs: Callable[[], list[RunDir]], run_dirs: Mapping[int, str | os.PathLike]) -> list[RunDir]:
    """``open_runs()`` on the main process; every other process of a multi-process run learns where
    each seed starts (or the main process's error) and holds the runs without their files."""
    shared = hosts.from_main(open_runs, lambda runs: {str(run.seed): run.start_epoch for run in runs})
    if hosts.is_main():
        return shared
    return [RunDir.elsewhere(seed, Path(out), shared[str(seed)]) for seed, out in run_dirs.items()]


def _restored_states(engine: Engine, group: list[RunDir]):
    """The restored states of ``group``'s seeds, stacked as numpy arrays (from the main process,
    which alone read them, on every process)."""
    like = jax.eval_shape(engine.init, jax.random.key(0))
    empty = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), like)
    per_seed = [empty if run.state is None else run.state for run in group]
    return hosts.broadcast(jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_seed))


def _train_group(engine: Engine, recipe: Recipe, group: list[RunDir], start_epoch: int, train_set, test_set,
                 log, on_epoch_end, progress_enabled, name_seeds: bool) -> None:  # fmt: skip
    """Epochs ``start_epoch`` .. of the seeds in ``group``, stacked on one seed axis."""
    seeds = [run.seed for run in group]
    states, keys = engine.init_seeds(seeds)
    if start_epoch:
        states = engine.put_seeds(_restored_states(engine, group))
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
            kept = [f"{run.out / 'checkpoints'} (epoch {run.last_epoch})" for run in group if run.last_epoch]
            where = (f"The last good checkpoints are kept: {', '.join(kept)}" if kept
                     else "No checkpoint was written yet (this is its first epoch)")
            raise NonFiniteLoss(f"epoch {epoch + 1}: training loss is {bad[0][1]}{which}; run stopped. {where}")
        bar.status(f"evaluating {len(seeds)} seed(s) on {test_set[1].shape[0]:,} test images")
        tests = engine.evaluate_seeds(states, *test_set)
        epoch_seconds = round(time.perf_counter() - started, 3)
        bar.status("saving checkpoints")
        saved = states if hosts.count() == 1 else hosts.to_host(states)  # states split over processes: gathered
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
            run.commit_epoch(row, seed_slice(saved, k))
            bar.close()
            log(f"epoch {row['epoch']:>2}/{recipe.epochs}{f' seed {run.seed}' if name_seeds else ''}  lr {lr:.5f}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2f}%  "
                f"{row['epoch_seconds']:.1f} s")  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(run.seed, row)
    bar.close()
