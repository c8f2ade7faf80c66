"""A training run on disk: config, per-epoch metrics, orbax checkpoints, resume, NaN stop.

``train`` runs one seed into ``out_dir``; ``train_seeds`` runs several seeds in one compiled
program, each into its own directory (``seed_dirs``: ``<out>/seed-<s>``) with exactly the
files a single-seed run of it writes.

A run directory (``jax_mnist.rundir`` checks, locks and verifies it) holds ``config.json``,
``metrics.jsonl`` (one JSON object per finished epoch: ``epoch`` 1-based, ``lr``,
``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``epoch_seconds``;
accuracies in percent; a recipe with ``validation`` N > 0 holds N training examples out,
trains on the rest and records ``val_loss``, ``val_accuracy`` instead of the test figures),
the orbax checkpoints of the last two epochs and of the best one, and their digests.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jax_mnist import hosts
from jax_mnist.data import Mnist, split_validation
from jax_mnist.distill import Teacher
from jax_mnist.engine import (
    ProgramConfig,
    Programs,
    inference_weights,
    means,
    programs_for,
    seed_slice,
    steps_per_epoch,
)
from jax_mnist.recipes import Recipe
from jax_mnist.rundir import RunDir, RunError, check_run_dir, load_teacher, run_identity, scored_split
from jax_mnist.streams import RunKeys


class NonFiniteLoss(RunError):
    pass


class Progress:
    """Progress of an epoch, updated from Python between its compiled chunks.

    On a terminal (stderr): a tqdm bar with steps, rate, time left and the running loss. Off a
    terminal (a log file): one plain line at most every ``plain_every_s`` seconds, so a long epoch
    is not silent and a short one adds nothing to the per-epoch lines. ``enabled``: True for the
    bar, False for nothing (processes other than the main one), None to choose by stderr.
    """

    def __init__(
        self, epochs: int, steps_per_epoch: int, enabled: bool | None = None, plain_every_s: float = 30.0
    ):
        self.epochs, self.total, self.plain_every_s = epochs, steps_per_epoch, plain_every_s
        self.mode = (
            ("bar" if sys.stderr.isatty() else "plain") if enabled is None else ("bar" if enabled else "off")
        )
        self.bar: tqdm.tqdm | None = None
        self.label, self.done, self.started, self.last_line = "", 0, 0.0, 0.0
        self.compiling = False

    def start_epoch(self, epoch: int, first_in_process: bool) -> None:
        self.close()
        self.label, self.done = f"epoch {epoch + 1}/{self.epochs}", 0
        self.started = self.last_line = time.monotonic()
        self.compiling = first_in_process
        if self.mode == "bar":
            self.bar = self._new_bar(0)
            self.bar.set_postfix_str("compiling, then training" if first_in_process else "training")

    def _new_bar(self, initial: int) -> tqdm.tqdm:
        return tqdm.tqdm(
            total=self.total,
            initial=initial,
            desc=self.label,
            unit="step",
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def __call__(self, steps_done: int, totals: dict) -> None:
        loss = float(np.sum(totals["loss_sum"]) / max(int(np.sum(totals["count"])), 1))
        if self.bar is not None and self.compiling:
            # The first chunk of a process includes the compile: rate and time left count from
            # after it (a new bar that starts at these steps), not from the epoch's start.
            self.bar.close()
            self.bar = self._new_bar(steps_done)
            self.bar.set_postfix_str(f"loss {loss:.4f}")
        elif self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            self.bar.update(steps_done - self.done)
            self.bar.refresh()  # chunks are seconds apart: show each one (tqdm would skip quick updates)
        self.compiling = False
        now = time.monotonic()
        if self.mode == "plain" and steps_done < self.total and now - self.last_line >= self.plain_every_s:
            print(
                f"{self.label}: {steps_done}/{self.total} steps, {now - self.started:.0f} s, loss {loss:.4f}",
                file=sys.stderr,
                flush=True,
            )
            self.last_line = now
        self.done = steps_done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def epoch_line(row: dict, epochs: int, seed: int | None = None) -> str:
    """The line a run prints after each epoch, from that epoch's ``metrics.jsonl`` row."""
    split = scored_split(row)
    return (
        f"epoch {row['epoch']:>2}/{epochs}{'' if seed is None else f' seed {seed}'}  lr {row['lr']:.5f}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2f}%  "
        f"{split} loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_accuracy']:.2f}%  "
        f"{row['epoch_seconds']:.1f} s"
    )


def train_epoch(
    programs: Programs,
    states,
    train_set,
    keys: RunKeys,
    epoch: int,
    progress: Callable[[int, dict], None] | None = None,
    chunks: int = 10,
):
    """One pass of every seed over the (placed) training set ``(images, labels)``.

    ``states``/``keys`` are stacked on a leading seed axis (``Programs.init_seeds``); ``states``
    is donated. The epoch is the shuffle, then ``chunks`` calls of the epoch-chunk program and the
    short last batch; the host reads each chunk's metrics after the next one is queued.
    Returns (states, per-seed summed metrics as numpy arrays). ``progress``, if given, is called
    after each chunk with the steps done and the metrics so far.
    """
    images, labels = train_set
    n = labels.shape[0]
    orders = programs.shuffle(keys.shuffle, jnp.asarray(epoch, jnp.int32))
    totals, pending = None, None  # pending: the previous chunk's metrics, read after the next is queued

    def add(totals, sums, steps_done):
        sums = hosts.to_host(sums)  # waits for that chunk
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        if progress is not None:
            progress(steps_done, totals)
        return totals

    for first, last in programs.chunks(n, chunks):
        states, sums = programs.train_chunk(
            states,
            images,
            labels,
            orders,
            keys.step,
            jnp.asarray(first, jnp.int32),
            jnp.asarray(last, jnp.int32),
        )
        if pending is not None:
            totals = add(totals, *pending)
        pending = (sums, last)
    if n % programs.batch_size:
        states, sums = programs.train_last(states, images, labels, orders, keys.step)
        if pending is not None:
            totals = add(totals, *pending)
        pending = (sums, steps_per_epoch(n, programs.batch_size))
    return states, add(totals, *pending)


def evaluate_seeds(programs: Programs, states, test_set) -> list[dict[str, float]]:
    """Mean loss, accuracy (%) and count of each seed of stacked ``states`` on ``(images, labels)``."""
    sums = hosts.to_host(programs.evaluate(*inference_weights(states), *test_set))
    return [means(seed_slice(sums, k)) for k in range(len(sums["count"]))]


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
    histories = train_seeds(
        recipe,
        data,
        {seed: out_dir},
        resume=resume,
        train_examples=train_examples,
        log=log,
        on_epoch_end=hook,
    )
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
    training_split = data.train_labels.shape[0]
    (train_images, train_labels), held_out = split_validation(
        data.train_images, data.train_labels, recipe.validation
    )
    num_train = train_labels.shape[0]
    train_examples = num_train if train_examples is None else train_examples
    if not run_dirs:
        raise RunError("no seeds to train")
    bad_seeds = [s for s in run_dirs if not (isinstance(s, int) and 0 <= s <= MAX_SEED)]
    if bad_seeds:
        raise RunError(f"seeds must be whole numbers from 0 to 2**63 - 1, found {bad_seeds[0]}")
    if not 1 <= train_examples <= num_train:
        kept = f" (the {recipe.validation:,} validation examples held out)" if recipe.validation else ""
        raise RunError(f"--train-examples must be between 1 and {num_train}{kept}, found {train_examples}")
    if recipe.batch_size > train_examples:
        raise RunError(
            f"batch size {recipe.batch_size} is larger than the {train_examples} training examples"
        )
    if not hosts.is_main():  # process 0 of a multi-process run prints, and alone reads and writes the runs
        log, progress = (lambda message: None), False
    teacher = load_teacher(recipe, jax.devices()[0].platform)  # None unless the recipe distils
    programs = functools.partial(_programs, recipe, train_examples, teacher)
    with contextlib.ExitStack() as stack:
        runs = _shared_runs(
            lambda: _open_runs(
                stack, programs(1), recipe, run_dirs, resume, train_examples, training_split, log, teacher
            ),
            run_dirs,
        )
        # The data sets are placed alike for every number of seeds. A run with a validation split
        # is scored on it alone: the test set is left for the figures reported.
        train_set = programs(1).place_data((train_images[:train_examples], train_labels[:train_examples]))
        scored = ("val", held_out) if recipe.validation else ("test", (data.test_images, data.test_labels))
        score_set = (scored[0], programs(1).place_data(scored[1]))
        groups: dict[int, list[RunDir]] = {}
        for run in runs:
            if run.start_epoch >= recipe.epochs:
                log(f"seed {run.seed}: all {recipe.epochs} epochs are done in {run.out}")
            else:
                groups.setdefault(run.start_epoch, []).append(run)
        with hosts.peer_loss_stops_the_run():
            for start_epoch, group in sorted(groups.items()):
                _train_group(
                    programs(len(group)),
                    recipe,
                    group,
                    start_epoch,
                    train_set,
                    score_set,
                    log,
                    on_epoch_end,
                    progress,
                    name_seeds=len(runs) > 1,
                )
    return {run.seed: run.history for run in runs}


def _programs(recipe: Recipe, train_examples: int, teacher: Teacher | None, seeds: int) -> Programs:
    return programs_for(ProgramConfig(recipe, train_examples, seeds), teacher)


def _open_runs(
    stack: contextlib.ExitStack,
    programs: Programs,
    recipe: Recipe,
    run_dirs: Mapping[int, str | os.PathLike],
    resume: bool,
    train_examples: int,
    training_split: int,
    log,
    teacher: Teacher | None,
) -> list[RunDir]:
    """Every run directory checked, then each opened (locked, restored) for the life of ``stack``."""
    plans = {
        seed: (Path(out), run_identity(recipe, seed, train_examples, training_split, teacher))
        for seed, out in run_dirs.items()
    }
    started = {
        seed
        for seed, (out, _) in plans.items()
        if out.is_dir() and any(p.name != ".lock" for p in out.iterdir())
    }
    if resume and len(plans) > 1 and not started:
        raise RunError(
            f"none of the run directories exists yet ({', '.join(str(out) for out, _ in plans.values())}): "
            "nothing to resume (drop --resume to start the runs)"
        )
    # With --resume, seeds of a multi-seed run that have not started yet start now.
    previous = {
        seed: check_run_dir(out, identity, resume and (seed in started or len(plans) == 1), recipe.schedule)
        for seed, (out, identity) in plans.items()
    }
    # The state's structure, to restore checkpoints into: traced only when something is resumed.
    like = (
        jax.eval_shape(programs.init_state, jax.random.key(0))
        if any(p is not None for p in previous.values())
        else None
    )
    return [
        stack.enter_context(RunDir.open(seed, out, identity, previous[seed], like, log))
        for seed, (out, identity) in plans.items()
    ]


def _shared_runs(
    open_runs: Callable[[], list[RunDir]], run_dirs: Mapping[int, str | os.PathLike]
) -> list[RunDir]:
    """``open_runs()`` on the main process; every other process of a multi-process run learns where
    each seed starts (or the main process's error) and holds the runs without their files."""
    shared = hosts.from_main(open_runs, lambda runs: {str(run.seed): run.start_epoch for run in runs})
    if hosts.is_main():
        return shared
    return [RunDir.elsewhere(seed, Path(out), shared[str(seed)]) for seed, out in run_dirs.items()]


def _restored_states(programs: Programs, group: list[RunDir]):
    """The restored states of ``group``'s seeds, stacked as numpy arrays (from the main process,
    which alone read them, on every process)."""
    like = jax.eval_shape(programs.init_state, jax.random.key(0))
    empty = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), like)
    per_seed = [empty if run.state is None else run.state for run in group]
    return hosts.broadcast(
        jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_seed)
    )


def _train_group(
    programs: Programs,
    recipe: Recipe,
    group: list[RunDir],
    start_epoch: int,
    train_set,
    score_set: tuple[str, tuple],
    log,
    on_epoch_end,
    progress_enabled,
    name_seeds: bool,
) -> None:
    """Epochs ``start_epoch`` .. of the seeds in ``group``, stacked on one seed axis, each scored
    on ``score_set``: ("test", test set) or ("val", the validation split)."""
    split, scored_set = score_set
    seeds = [run.seed for run in group]
    states, keys = programs.init_seeds(seeds)
    if start_epoch:
        states = programs.place_states(_restored_states(programs, group))
        for run in group:
            log(
                f"seed {run.seed}: resumed from the checkpoint of epoch {start_epoch} in "
                f"{run.out / 'checkpoints'}"
            )
    train_examples = train_set[1].shape[0]
    per_epoch = steps_per_epoch(train_examples, recipe.batch_size)
    bar = Progress(recipe.epochs, per_epoch, progress_enabled)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        lr = float(programs.learning_rate(jnp.asarray(epoch * per_epoch, jnp.int32)))
        bar.start_epoch(epoch, first_in_process=epoch == start_epoch)
        states, sums = train_epoch(programs, states, train_set, keys, epoch, progress=bar)
        train_losses = sums["loss_sum"] / sums["count"]
        bad = [(s, float(loss)) for s, loss in zip(seeds, train_losses) if not math.isfinite(loss)]
        if bad:
            bar.close()
            which = "" if len(seeds) == 1 else " for seed " + ", ".join(str(s) for s, _ in bad)
            kept = [f"{run.out / 'checkpoints'} (epoch {run.last_epoch})" for run in group if run.last_epoch]
            where = (
                f"The last good checkpoints are kept: {', '.join(kept)}"
                if kept
                else "No checkpoint was written yet (this is its first epoch)"
            )
            raise NonFiniteLoss(
                f"epoch {epoch + 1}: training loss is {bad[0][1]}{which}; run stopped. {where}"
            )
        where = "test images" if split == "test" else "validation images"
        bar.status(f"evaluating {len(seeds)} seed(s) on {scored_set[1].shape[0]:,} {where}")
        scores = evaluate_seeds(programs, states, scored_set)
        epoch_seconds = round(time.perf_counter() - started, 3)
        bar.status("saving checkpoints")
        saved = (
            states if hosts.count() == 1 else hosts.to_host(states)
        )  # states split over processes: gathered
        for k, run in enumerate(group):
            row = {
                "epoch": epoch + 1,
                "lr": float(str(np.float32(lr))),  # the float32 LR used, in its shortest decimal form
                "train_loss": float(train_losses[k]),
                "train_accuracy": 100.0 * int(sums["correct"][k]) / int(sums["count"][k]),
                f"{split}_loss": scores[k]["loss"],
                f"{split}_accuracy": scores[k]["accuracy"],
                "epoch_seconds": epoch_seconds,
            }
            run.commit_epoch(row, seed_slice(saved, k))
            bar.close()
            log(epoch_line(row, recipe.epochs, run.seed if name_seeds else None))
            if on_epoch_end is not None:
                on_epoch_end(run.seed, row)
    bar.close()
