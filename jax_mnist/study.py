"""The study: every recipe over seeds, in ``<study>/<recipe>/seed-<s>/`` (what ``train --seeds`` writes).

``read_study`` reads what is on disk; ``plan`` says what is left (and ``estimate_seconds`` how long
it may take, from the study's own timings); ``run_study`` trains what is left, recipe by recipe,
each recipe's seeds in one program, resumable after any interruption.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from jax_mnist import hosts
from jax_mnist.errors import JaxMnistError
from jax_mnist.recipes import RECIPE_NAMES, Recipe, get_recipe, with_overrides
from jax_mnist.run import seed_dirs, train_seeds
from jax_mnist.rundir import (
    MNIST_TRAIN_EXAMPLES,
    RunRecord,
    identity_differences,
    read_run,
    run_identity,
)
from jax_mnist.summary import summarize

# The order a study runs in when none is given: the project's recipes first, then the walk from
# the cheap end (the most expensive, model 1, last): what says most per CPU hour comes first.
STUDY_ORDER = (
    "final",
    "final_onecycle",
    "final_translate",
    "ours_8k",
    "ours_8k_scale",
    "ours_5k",
    "ours_5k_ema",
    "ours_4k",
    "ours_3762_ema",
    "ours_3k",
    "ours_3000_ema",
    "ours_2k",
    "model_8_dropout_maxpool",
    "model_7_max_capacity",
    "model_6_gap",
    "model_5_regularization",
    "model_4_batchnorm",
    "model_3_lighter_model",
    "model_2_skeleton",
    "model_1_setup",
)


class StudyError(JaxMnistError, ValueError):
    pass


def _seed_of(directory: Path) -> int | None:
    prefix, _, number = directory.name.partition("-")
    return int(number) if prefix == "seed" and number.isdigit() else None


def _read(directory: Path) -> RunRecord:
    try:
        return read_run(directory)
    except JaxMnistError as e:  # RunError, or a malformed file (schema.SchemaError)
        raise StudyError(f"{e}") from None


def read_recipe_runs(recipe_dir: Path) -> list[RunRecord]:
    """The seeds of one recipe directory that have a config, sorted by seed (read only)."""
    runs = []
    for directory in sorted(recipe_dir.iterdir()):
        seed = _seed_of(directory)
        if seed is None or not (directory / "config.json").exists():
            continue
        run = _read(directory)
        if run.recipe_name != recipe_dir.name or run.seed != seed:
            raise StudyError(
                f"{directory}: holds recipe {run.recipe_name!r} seed {run.seed}, but its place in the study "
                f"says recipe {recipe_dir.name!r} seed {seed}"
            )
        runs.append(run)
    return sorted(runs, key=lambda r: r.seed)


def read_study(study_dir: str | os.PathLike) -> dict[str, list[RunRecord]]:
    """recipe name -> its recorded seeds; recipes in registry order, then any others by name."""
    root = Path(study_dir)
    if not root.is_dir():
        raise StudyError(f"{root}: no such study directory")
    found = {d.name: read_recipe_runs(d) for d in root.iterdir() if d.is_dir()}
    return _in_registry_order({name: runs for name, runs in found.items() if runs})


def _in_registry_order(found: dict[str, list[RunRecord]]) -> dict[str, list[RunRecord]]:
    """Registered recipes in registry order, then any others by name."""
    order = {name: i for i, name in enumerate(RECIPE_NAMES)}
    return dict(sorted(found.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


LAYOUTS = (
    "<recipe>/seed-<s>/config.json (a study: jax-mnist study, or train --seeds with --out <dir>/<recipe>)",
    "<name>/config.json (train's runs/<recipe>-seed<s>)",
    "seed-<s>/config.json (one train --seeds --out directory)",
    "config.json (one run directory)",
)


def _by_recipe(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    grouped: dict[str, list[RunRecord]] = {}
    for run in runs:
        grouped.setdefault(run.recipe_name, []).append(run)
    return {name: sorted(found, key=lambda r: r.seed) for name, found in grouped.items()}


def read_runs(directory: str | os.PathLike) -> dict[str, list[RunRecord]]:
    """Every run under ``directory`` by recipe, in whichever layout it holds (``LAYOUTS``): a study,
    train's ``runs/`` of single runs, one multi-seed ``--out``, or one run directory. A directory
    with no run in any of them is an error that names what it found and the layouts read."""
    root = Path(directory)
    if not root.is_dir():
        raise StudyError(f"{root}: no such study directory")
    if (root / "config.json").exists():
        return _in_registry_order(_by_recipe([_read(root)]))
    study = read_study(root)
    if study:
        return study
    flat = [_read(d) for d in sorted(root.iterdir()) if d.is_dir() and (d / "config.json").exists()]
    if flat:
        return _in_registry_order(_by_recipe(flat))
    entries = sorted(p.name for p in root.iterdir())
    seen = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise StudyError(
        f"{root}: no run found (it holds {seen or 'nothing'}); expected one of: " + "; ".join(LAYOUTS)
    )


# --------------------------------------------------------------------------- timing


def seconds_per_seed_epoch(runs: Sequence[RunRecord]) -> list[float]:
    """Wall seconds of one seed's epoch, for every recorded epoch of ``runs``.

    Seeds trained together in one program record the same ``epoch_seconds`` for an epoch (the
    time of all of them): such a time is divided by the number of seeds that share it.
    """
    shared: dict[tuple[int, float], int] = {}
    for run in runs:
        for row in run.history:
            key = (row["epoch"], row["epoch_seconds"])
            shared[key] = shared.get(key, 0) + 1
    return [
        row["epoch_seconds"] / shared[(row["epoch"], row["epoch_seconds"])]
        for run in runs
        for row in run.history
    ]


def trainings(runs: Sequence[RunRecord]) -> list[tuple[list[int], float]]:
    """The trainings that made ``runs``: (seeds, wall seconds) for each group of seeds trained
    together in one program (they record the same ``epoch_seconds`` for every epoch), in seed
    order; the wall seconds are the sum of the epochs' recorded times."""
    groups: dict[tuple[float, ...], list[int]] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        groups.setdefault(tuple(row["epoch_seconds"] for row in run.history), []).append(run.seed)
    return [(seeds, sum(times)) for times, seeds in groups.items()]


def _multiply_adds(recipe: Recipe) -> int:
    return _model_multiply_adds(recipe.model)


@functools.cache
def _model_multiply_adds(model: str) -> int:
    """Once per model: every estimate of a plan asks it of every timed recipe."""
    return summarize(model).multiply_adds


def seed_epoch_seconds(recipe: Recipe, study: dict[str, list[RunRecord]]) -> tuple[float, str] | None:
    """Median seconds of one seed-epoch of ``recipe`` and how it was found: measured in the study;
    else that of a timed network of about the same multiply-adds; else read off a log-log line
    through the timed networks' multiply-adds (when they span a factor 2 or more). None: no basis."""
    runs = [r for r in study.get(recipe.name, []) if r.config["recipe"]["batch_size"] == recipe.batch_size]
    times = seconds_per_seed_epoch(runs)
    if times:
        return statistics.median(times), "measured"
    points: dict[int, list[float]] = {}
    for other in study.values():
        times = seconds_per_seed_epoch(other)
        if times:
            points.setdefault(_multiply_adds(Recipe(**other[0].config["recipe"])), []).append(
                statistics.median(times)
            )
    if not points:
        return None
    sizes = sorted(points)
    logs = [math.log(x) for x in sizes]
    ys = [math.log(statistics.median(points[x])) for x in sizes]
    target = math.log(_multiply_adds(recipe))
    nearest = min(range(len(sizes)), key=lambda i: abs(logs[i] - target))
    if abs(logs[nearest] - target) < math.log(1.25):  # about the size of one timed: its time
        return statistics.median(points[sizes[nearest]]), "from a network of about this size"
    if logs[-1] - logs[0] < math.log(2):  # timed networks all of about one size: no line to draw
        return None
    slope = statistics.linear_regression(logs, ys).slope
    intercept = statistics.mean(ys) - slope * statistics.mean(logs)
    inside = logs[0] <= target <= logs[-1]
    return math.exp(intercept + slope * target), f"{'inter' if inside else 'extra'}polated by multiply-adds"


# --------------------------------------------------------------------------- plan and run


@dataclasses.dataclass(frozen=True)
class Todo:
    """What is left of one recipe: its seeds and the epochs each still needs."""

    recipe: Recipe
    epochs_left: dict[int, int]  # seed -> epochs still to train

    @property
    def seed_epochs(self) -> int:
        return sum(self.epochs_left.values())


def study_recipe(name: str, max_epochs: int | None) -> Recipe:
    recipe = get_recipe(name)
    if max_epochs is not None and max_epochs < recipe.epochs:
        recipe = with_overrides(recipe, {"epochs": max_epochs})
    return recipe


def plan(
    study_dir: str | os.PathLike,
    recipes: Sequence[str],
    seeds: Sequence[int],
    max_epochs: int | None = None,
    train_examples: int | None = None,
) -> list[Todo]:
    """What is not complete yet: for each recipe (in the order given), the seeds with epochs left.

    A seed's directory counts only when it holds this study's run (the same recipe, seed and
    training examples; a StepLR or constant run with fewer epochs is extended); one holding
    another run is a StudyError naming what differs, before anything is trained."""
    root = Path(study_dir)
    examples = MNIST_TRAIN_EXAMPLES if train_examples is None else train_examples
    todos, conflicts = [], []
    for name in recipes:
        recipe = study_recipe(name, max_epochs)
        recorded = {r.seed: r for r in read_recipe_runs(root / name)} if (root / name).is_dir() else {}
        left = {}
        for s in seeds:
            run = recorded.get(s)
            if run is None:
                left[s] = recipe.epochs
                continue
            asked = run_identity(recipe, s, examples)
            differences = identity_differences({k: run.config.get(k) for k in asked}, asked)
            epochs = differences.pop("recipe.epochs", None)
            # StepLR and constant runs of other lengths share their first epochs: a longer one holds
            # a shorter one, a shorter one is extended; a OneCycle schedule depends on its length.
            shorter_unfinished = (
                epochs is not None and epochs[1] < epochs[0] and len(run.history) < recipe.epochs
            )
            if differences or (epochs is not None and (recipe.schedule == "onecycle" or shorter_unfinished)):
                if epochs is not None:
                    differences["recipe.epochs"] = epochs
                listed = "; ".join(
                    f"{k}: {old!r} there, {new!r} asked" for k, (old, new) in differences.items()
                )
                conflicts.append(f"{run.out} ({listed})")
                continue
            left[s] = max(0, recipe.epochs - len(run.history))
        left = {s: n for s, n in left.items() if n > 0}
        if left:
            todos.append(Todo(recipe, left))
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise StudyError(
            f"{'; '.join(conflicts[:3])}{more}: these directories hold other runs than this study asks "
            "for; move them elsewhere, or give the study another --out"
        )
    return todos


def estimate_seconds(todo: Todo, study: dict[str, list[RunRecord]]) -> tuple[float, str] | None:
    found = seed_epoch_seconds(todo.recipe, study)
    if found is None:
        return None
    seconds, how = found
    return seconds * todo.seed_epochs, how


def format_duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def abbreviated(items: list[str], head: int = 8) -> str:
    """``items`` joined by commas; a long list as its first ``head``, "…", its last, and the count."""
    if len(items) <= head + 2:
        return ", ".join(items)
    return f"{', '.join(items[:head])}, …, {items[-1]} ({len(items):,} seeds)"


def describe_plan(todos: Sequence[Todo], study: dict[str, list[RunRecord]]) -> str:
    """What is left, one line per recipe, with a time estimate from the study's own timings."""
    if not todos:
        return "nothing left: every recipe x seed asked for is complete"
    lines, total, unknown = [], 0.0, False
    for todo in todos:
        seeds = abbreviated(
            [f"{s} ({n} ep)" if n != todo.recipe.epochs else str(s) for s, n in todo.epochs_left.items()]
        )
        estimate = estimate_seconds(todo, study)
        if estimate is None:
            unknown, when = True, "no estimate yet (no network of this size timed)"
        else:
            total += estimate[0]
            when = f"~{format_duration(estimate[0])} ({estimate[1]})"
        lines.append(f"  {todo.recipe.name:<24} seeds {seeds:<28} {when}")
    head = f"left: {len(todos)} recipe(s), {sum(t.seed_epochs for t in todos)} seed-epochs"
    head += f", about {format_duration(total)}" + (" plus what cannot be estimated yet" if unknown else "")
    return "\n".join([head + " (from the timings recorded in the study):", *lines])


def run_study(
    study_dir: str | os.PathLike,
    recipes: Sequence[str],
    seeds: Sequence[int],
    data,
    max_epochs: int | None = None,
    train_examples: int | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Train everything ``plan`` lists, recipe by recipe (its seeds together), resuming what was started."""
    root = Path(study_dir)
    if not hosts.is_main():  # a multi-process study: process 0 reads the study, prints and writes
        log = lambda message: None  # noqa: E731
    previous = None
    while True:
        todos, started = _next_round(root, recipes, seeds, max_epochs, train_examples, log)
        if not todos:
            return
        todo = todos[0]
        if todo == previous:  # train_seeds returned without training: never loop on it
            raise StudyError(f"{root / todo.recipe.name}: training made no progress ({todo.epochs_left})")
        previous = todo
        dirs = seed_dirs(root / todo.recipe.name, list(todo.epochs_left))
        log(
            f"training {todo.recipe.name} seeds {abbreviated([str(s) for s in todo.epochs_left])} -> "
            f"{root / todo.recipe.name}"
        )
        train_seeds(todo.recipe, data, dirs, resume=started, train_examples=train_examples, log=log)


def _next_round(
    root: Path,
    recipes: Sequence[str],
    seeds: Sequence[int],
    max_epochs: int | None,
    train_examples: int | None,
    log: Callable[[str], None],
) -> tuple[list[Todo], bool]:
    """What is left (printed), and whether the first recipe's runs were started: read from the
    study by the main process, the same on every process of a multi-process study."""

    def read() -> tuple[list[Todo], bool]:
        todos = plan(root, recipes, seeds, max_epochs, train_examples)
        log(describe_plan(todos, read_study(root) if root.is_dir() else {}))
        dirs = seed_dirs(root / todos[0].recipe.name, list(todos[0].epochs_left)).values() if todos else ()
        return todos, any(d.is_dir() and any(d.iterdir()) for d in dirs)

    shared = hosts.from_main(
        read,
        lambda found: {
            "todos": [[t.recipe.name, list(t.epochs_left.items())] for t in found[0]],
            "started": found[1],
        },
    )
    if hosts.is_main():
        return shared
    todos = [
        Todo(study_recipe(name, max_epochs), {seed: left for seed, left in epochs_left})
        for name, epochs_left in shared["todos"]
    ]
    return todos, shared["started"]
