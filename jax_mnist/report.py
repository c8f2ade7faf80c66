"""The study's report, from its run directories alone: a Markdown table and four figures.

``render_markdown`` gives the table (one row per recipe, as distributions over seeds), the walk
of the original read against seed noise, the smallest net that holds the target, and links to
``curves.png``, ``frontier.png`` (accuracy per parameter), ``misclassified.png`` and
``confusion.png``, which ``write_figures`` draws (deterministic bytes for given inputs).
``render_screening`` gives the validation figures of screening runs.
``paste_into`` puts the Markdown between two marker lines of a README.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jax_mnist.errors import JaxMnistError
from jax_mnist.files import write_atomically
from jax_mnist.inference import evaluation_paths, read_predictions
from jax_mnist.recipes import RECIPE_NAMES, SELECTION, get_recipe, nearest_registered
from jax_mnist.rundir import MNIST_TRAIN_EXAMPLES, RunRecord, identity_differences, non_finite_fields
from jax_mnist.study import read_runs, seconds_per_seed_epoch, trainings
from jax_mnist.summary import summarize

TARGET = 99.4  # % test accuracy, the original's goal
LAST = 3  # ... held in each of the last LAST epochs

# The original README's best test accuracy per run (shared/spec/s7_study.md, "Reported results").
ORIGINAL_BEST_TEST = {
    "model_1_setup": 99.11,
    "model_2_skeleton": 98.9,
    "model_3_lighter_model": 98.6,
    "model_4_batchnorm": 98.96,
    "model_5_regularization": 98.92,
    "model_6_gap": 98.97,
    "model_7_max_capacity": 99.3,
    "model_8_dropout_maxpool": 99.3,
    "final": 99.43,
}
# The original's walk, each step against the one before it; then this project's recipe.
WALK = (
    "model_1_setup",
    "model_2_skeleton",
    "model_3_lighter_model",
    "model_4_batchnorm",
    "model_5_regularization",
    "model_6_gap",
    "model_7_max_capacity",
    "model_8_dropout_maxpool",
    "final",
    "final_onecycle",
)
FIGURES = ("curves.png", "frontier.png", "misclassified.png", "confusion.png")
# The run whose test-set errors are drawn, when none is named: the project's best recipe.
DEFAULT_EVALUATED_RUN = "final_onecycle/seed-1"
MARKERS = ("<!-- jax-mnist report: start -->", "<!-- jax-mnist report: end -->")
# Where `report --screening --readme FILE` pastes its table (docs/accuracy.md).
SCREENING_MARKERS = ("<!-- screening table: start -->", "<!-- screening table: end -->")


def screening_markers(document: str, study_dir: str | os.PathLike) -> tuple[str, str]:
    """Where the screening table of ``study_dir`` goes in ``document``: between the markers that
    name it (``<!-- screening table of DIR: start -->`` ... ``end -->``), so that one document can
    hold the tables of several directories; else between the plain ``SCREENING_MARKERS``."""
    name = Path(study_dir).as_posix().rstrip("/")
    named = (f"<!-- screening table of {name}: start -->", f"<!-- screening table of {name}: end -->")
    return named if named[0] in document else SCREENING_MARKERS


class ReportError(JaxMnistError, ValueError):
    pass


@dataclass(frozen=True)
class RecipeResult:
    """One recipe over its seeds; figures only over the finished seeds."""

    name: str
    model: str
    planned_epochs: int  # the registered recipe's epochs
    runs: list[RunRecord]  # seeds of one identity (recipe and data): samples of one experiment
    left_out: tuple = ()  # (seed, why) of runs in the recipe's directory with another identity
    split: str = "test"  # what the figures are of: "test", or "val" (screening runs' validation split)

    @property
    def train_examples(self) -> int:
        return self.runs[0].train_examples if self.runs else MNIST_TRAIN_EXAMPLES

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.finished]

    def accuracies(self, run: RunRecord) -> list[float]:
        return run.accuracies(self.split)

    @property
    def last(self) -> list[float]:
        return [self.accuracies(r)[-1] for r in self.finished]

    @property
    def window_minima(self) -> list[float]:
        return [min(self.accuracies(r)[-LAST:]) for r in self.finished]

    @property
    def held(self) -> int:
        return sum(m >= TARGET for m in self.window_minima)


_OTHER_SPLIT = {
    "test": "a screening run, scored on its validation split (jax-mnist report --screening shows it)",
    "val": "scored on the test set, not on a validation split",
}


def collect(study: dict[str, list[RunRecord]], split: str = "test") -> list[RecipeResult]:
    """A row of ``split``'s figures for every registered recipe (missing ones with no runs), then
    any other recipe found; with ``split="val"`` (screening runs) only the recipes that have runs
    scored on a validation split. Runs scored on the other split are left out, saying so."""
    names = list(RECIPE_NAMES) + [n for n in study if n not in RECIPE_NAMES]
    results = []
    for name in names:
        found = study.get(name, [])
        runs = [r for r in found if r.scored_split == split]
        other = tuple((r.seed, _OTHER_SPLIT[split]) for r in found if r.scored_split != split)
        if not runs and (split == "val" or name not in RECIPE_NAMES):
            continue  # a row for each registered recipe in the study table; the others where run
        if name in RECIPE_NAMES and split == "test":
            recipe = get_recipe(name)
            model, epochs = recipe.model, recipe.epochs
        else:
            model, epochs = runs[0].config["recipe"]["model"], runs[0].epochs
        kept, left_out = one_identity(name, runs)
        kept, broken = finite_runs(kept)
        results.append(
            RecipeResult(name, model, epochs, kept, tuple(sorted(left_out + broken + other)), split)
        )
    return results


def finite_runs(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], tuple]:
    """The runs whose recorded numbers are all finite, and (seed, why) for the others."""
    kept, broken = [], []
    for run in runs:
        bad = [(row["epoch"], field) for row in run.history for field in non_finite_fields(row)]
        if bad:
            epoch, field = bad[0]
            broken.append((run.seed, f"{field} is not finite at epoch {epoch}"))
        else:
            kept.append(run)
    return kept, tuple(broken)


def one_identity(name: str, runs: Sequence[RunRecord]) -> tuple[list[RunRecord], tuple]:
    """The runs of a recipe directory that are samples of one experiment (the same identity: the
    whole recipe and the data), and (seed, why) for each other run. The identity kept is the
    registered recipe's on the full training set when some run has it, else the most common."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.identity, sort_keys=True), []).append(run)
    if len(groups) <= 1:
        return list(runs), ()
    wanted = None
    if name in RECIPE_NAMES:
        identity = {"recipe": dataclasses.asdict(get_recipe(name)), "train_examples": MNIST_TRAIN_EXAMPLES}
        wanted = json.dumps(identity, sort_keys=True)
    key = wanted if wanted in groups else max(groups, key=lambda k: (len(groups[k]), -groups[k][0].seed))
    kept = groups[key]
    left_out = []
    for other, members in groups.items():
        if other == key:
            continue
        differences = identity_differences(members[0].identity, kept[0].identity)
        why = "another run: " + ", ".join(
            f"{k.removeprefix('recipe.')} {old!r} (the row: {new!r})" for k, (old, new) in differences.items()
        )
        left_out += [(run.seed, why) for run in members]
    return kept, tuple(left_out)


# --------------------------------------------------------------------------- Markdown


def _seed_list(seeds: Sequence[int]) -> str:
    """1, 2, 3, 5 -> "1-3, 5"."""
    parts, start = [], None
    ordered = sorted(seeds)
    for i, s in enumerate(ordered):
        start = s if start is None else start
        if i + 1 == len(ordered) or ordered[i + 1] != s + 1:
            parts.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(parts)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_and_range(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _epochs_cell(result: RecipeResult) -> str:
    ran = sorted({r.epochs for r in result.runs}) or [result.planned_epochs]
    cells = [
        f"{e}" if e == result.planned_epochs else f"{e} (of {result.planned_epochs}, shortened)" for e in ran
    ]
    if result.train_examples != MNIST_TRAIN_EXAMPLES:
        cells.append(f"on {result.train_examples:,} training examples")
    return ", ".join(cells)


def _seeds_cell(result: RecipeResult) -> str:
    done = [r.seed for r in result.finished]
    unfinished = [r for r in result.runs if not r.finished]
    cell = _seed_list(done) if done else "none finished"
    if unfinished:
        cell += f" (unfinished: {', '.join(f'{r.seed} at epoch {len(r.history)}' for r in unfinished)})"
    if result.left_out:
        cell += f" (left out: {'; '.join(f'seed {seed}: {why}' for seed, why in result.left_out)})"
    return cell


def _last_epoch_cell(last: Sequence[float]) -> str:
    """Last-epoch accuracies over seeds: "mean ± std (min)", or the one value (no spread from one)."""
    if len(last) == 1:
        return f"{last[0]:.2f} (one seed)"
    return f"{statistics.mean(last):.2f} ± {_std(last):.2f} ({min(last):.2f})"


def _devices(runs: Sequence[RunRecord]) -> str:
    return "/".join(sorted({str(r.config.get("device", {}).get("kind", "?")) for r in runs}))


def _time_cell(result: RecipeResult) -> str:
    times = seconds_per_seed_epoch(result.finished)
    return f"{statistics.median(times):.0f} s, {_devices(result.finished)}"


def _trainings_cell(result: RecipeResult) -> str:
    """Wall minutes of each training that made the finished seeds ("2-3: 64.9" = seeds 2 and 3
    trained together in one program for 64.9 minutes), from the epochs' recorded times."""
    return "; ".join(
        f"{_seed_list(seeds)}: {seconds / 60:.1f}" for seeds, seconds in trainings(result.finished)
    )


def table_rows(results: Sequence[RecipeResult], summaries: dict) -> list[list[str]]:
    rows = []
    for res in results:
        summary = summaries[res.model]
        original = ORIGINAL_BEST_TEST.get(res.name)
        head = [f"`{res.name}`", f"`{res.model}`", f"{summary.total_params:,}", str(summary.receptive_field)]
        original_cell = "—" if original is None else f"{original:.2f}"
        if not res.runs:
            rows.append(head + [str(res.planned_epochs), "not run"] + ["—"] * 7 + [original_cell])
            continue
        if not res.finished:
            rows.append(head + [_epochs_cell(res), _seeds_cell(res)] + ["—"] * 7 + [original_cell])
            continue
        last, minima = res.last, res.window_minima
        rows.append(
            head
            + [
                _epochs_cell(res),
                _seeds_cell(res),
                _last_epoch_cell(last),
                _mean_and_range([max(res.accuracies(r)) for r in res.finished]),
                ", ".join(f"{m:.2f}" for m in minima),
                f"{res.held}/{len(res.finished)}",
                f"{statistics.mean(r.history[-1]['train_accuracy'] for r in res.finished):.2f}",
                _time_cell(res),
                _trainings_cell(res),
                original_cell,
            ]
        )
    return rows


TABLE_HEADER = [
    "recipe",
    "model",
    "params",
    "RF",
    "epochs",
    "seeds",
    "test % at the last epoch: mean ± std (min)",
    "best test %: mean (min-max)",
    f"per seed: min test % over the last {LAST} epochs",
    f"seeds ≥ {TARGET} in each of the last {LAST}",
    "train % at the last epoch (mean)",
    "seconds per epoch and seed (median), device",
    "wall minutes of each training (seeds trained together: minutes)",
    "original README: best test %",
]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def walk_rows(results: Sequence[RecipeResult]) -> list[list[str]]:
    """Each step of the walk: change of the mean last-epoch test accuracy, against seed noise
    (twice the standard error of the difference of two means)."""
    by_name = {r.name: r for r in results}
    rows = []
    for before, after in zip(WALK, WALK[1:]):
        a, b = by_name[before].last, by_name[after].last
        step = f"`{before}` → `{after}`"
        if not a or not b:
            rows.append([step, "—", "—", "not run yet"])
            continue
        difference = statistics.mean(b) - statistics.mean(a)
        if len(a) < 2 or len(b) < 2:
            rows.append(
                [step, f"{difference:+.2f}", "—", f"one seed on a side ({len(a)} vs {len(b)}): cannot tell"]
            )
            continue
        error = math.sqrt(_std(a) ** 2 / len(a) + _std(b) ** 2 / len(b))
        verdict = (
            "within seed noise" if abs(difference) < 2 * error else ("better" if difference > 0 else "worse")
        )
        rows.append(
            [step, f"{difference:+.2f}", f"{2 * error:.2f}", f"{verdict} ({len(a)} vs {len(b)} seeds)"]
        )
    return rows


def _code_of(run: RunRecord) -> str:
    code = run.config.get("code")
    if not isinstance(code, dict) or not code.get("commit"):
        return "commit not recorded"
    return f"commit {str(code['commit'])[:10]}" + (" (dirty)" if code.get("dirty") else "")


def _versions_of(run: RunRecord) -> dict:
    versions = run.config.get("versions")
    return versions if isinstance(versions, dict) else {}


def provenance_notes(results: Sequence[RecipeResult]) -> list[str]:
    """One line for each recipe whose runs were made by different code (git commits, dirty trees)
    or different versions of the libraries: which seeds each, from their config.json."""
    notes = []
    for res in results:
        by_code: dict[str, list[int]] = {}
        for run in res.runs:
            by_code.setdefault(_code_of(run), []).append(run.seed)
        if len(by_code) > 1:
            notes.append(
                f"- `{res.name}` was made by different code: "
                + "; ".join(f"{code} (seeds {_seed_list(seeds)})" for code, seeds in sorted(by_code.items()))
            )
        versions = [_versions_of(run) for run in res.runs]
        differing = sorted({k for v in versions for k in v if len({str(w.get(k)) for w in versions}) > 1})
        if differing:
            by_versions: dict[str, list[int]] = {}
            for run, v in zip(res.runs, versions):
                key = ", ".join(f"{k} {v.get(k, 'not recorded')}" for k in differing)
                by_versions.setdefault(key, []).append(run.seed)
            notes.append(
                f"- `{res.name}` was made by different versions: "
                + "; ".join(
                    f"{key} (seeds {_seed_list(seeds)})" for key, seeds in sorted(by_versions.items())
                )
            )
    return notes


CONFIRMATION_HEADER = [
    "recipe",
    "params",
    "how it was chosen",
    f"study seeds: held ≥ {TARGET} in each of the last {LAST}",
    "confirmation seeds",
    "test % at the last epoch: mean ± std (min)",
    f"per seed: min test % over the last {LAST} epochs",
    f"seeds ≥ {TARGET} in each of the last {LAST}",
]


def confirmation_rows(
    results: Sequence[RecipeResult], confirmed: Sequence[RecipeResult], summaries: dict
) -> list[list[str]]:
    """Per registered recipe: how it was chosen, what its study seeds held, and its figures on
    the confirmation seeds (where it has any)."""
    by_name = {r.name: r for r in confirmed}
    rows = []
    for res in results:
        if res.name not in RECIPE_NAMES:
            continue
        study_cell = f"{res.held}/{len(res.finished)}" if res.finished else "not run"
        head = [f"`{res.name}`", f"{summaries[res.model].total_params:,}", SELECTION[res.name], study_cell]
        fresh = by_name.get(res.name)
        if fresh is None or not fresh.runs:
            rows.append(head + ["not run"] + ["—"] * 3)
        elif not fresh.finished:
            rows.append(head + [_seeds_cell(fresh)] + ["—"] * 3)
        else:
            rows.append(
                head
                + [
                    _seeds_cell(fresh),
                    _last_epoch_cell(fresh.last),
                    ", ".join(f"{m:.2f}" for m in fresh.window_minima),
                    f"{fresh.held}/{len(fresh.finished)}",
                ]
            )
    return rows


def confirmation_section(
    results: Sequence[RecipeResult], confirmation_dir: str | os.PathLike | None, summaries: dict
) -> tuple[list[str], list[RecipeResult]]:
    """The Markdown of how each recipe was chosen and its confirmation seeds, and their results."""
    confirmed = collect(read_runs(confirmation_dir)) if confirmation_dir is not None else []
    where = (
        f"the runs in `{Path(confirmation_dir).as_posix()}` (seeds never used for any choice: trained once "
        "the recipe was fixed, by the study's command with other `--seeds` and `--out`)"
        if confirmation_dir is not None
        else "no confirmation directory given (`--confirmation DIR`)"
    )
    lines = [
        "How each recipe was chosen (`jax_mnist.recipes.SELECTION`; docs/accuracy.md has every candidate), "
        "and its confirmation seeds: " + where + ". A recipe chosen on the test accuracy of some seeds, or "
        "after the study seeds of an earlier recipe were seen, is tested cleanly only by its confirmation "
        "seeds.",
        "",
        *_markdown_table(CONFIRMATION_HEADER, confirmation_rows(results, confirmed, summaries)),
    ]
    return lines, confirmed


def render_markdown(
    study_dir: str | os.PathLike,
    figures_dir: str | os.PathLike,
    relative_to: str | os.PathLike,
    evaluated_run: str = DEFAULT_EVALUATED_RUN,
    confirmation_dir: str | os.PathLike | None = None,
) -> str:
    """The report as Markdown; figure links are relative to the directory ``relative_to``.
    ``confirmation_dir``: a study directory of the same recipes on seeds never used for any choice."""
    results = collect(read_runs(study_dir))
    summaries = {res.model: summarize(res.model) for res in results}
    confirmation, confirmed = confirmation_section(results, confirmation_dir, summaries)
    provenance = provenance_notes(results + confirmed)
    command = f"jax-mnist report {Path(study_dir).as_posix()}" + (
        f" --confirmation {Path(confirmation_dir).as_posix()}" if confirmation_dir is not None else ""
    )
    link = Path(os.path.relpath(Path(figures_dir), Path(relative_to))).as_posix()
    evaluated = _evaluated(study_dir, evaluated_run)
    lines = [
        f"Made by `{command}` from `config.json` and `metrics.jsonl` of each "
        "run directory (nothing typed in). Test accuracy is over the 10,000 test images after each epoch; "
        "figures are over the finished seeds only; the train accuracy is the running one of the last epoch "
        "(dropout on), as the original logged it. A recipe with no finished seed shows no figures.",
        "",
        *_markdown_table(TABLE_HEADER, table_rows(results, summaries)),
        "",
        *(
            ["Runs of one recipe made by different code or library versions (from their config.json):", ""]
            + provenance
            + [""]
            if provenance
            else []
        ),
        *confirmation,
        "",
        "Each step of the original's walk (then this project's recipe), read against seed noise: the change "
        "of the mean last-epoch test accuracy, and twice the standard error of that difference.",
        "",
        *_markdown_table(["step", "change (points)", "2 × standard error", "reading"], walk_rows(results)),
        "",
        f"![test accuracy per epoch]({link}/curves.png)",
        "",
        "Accuracy per parameter: each recipe's trainable parameters against its last-epoch test accuracy "
        f"(mean, and the range over its seeds), with how many seeds hold ≥ {TARGET} % over the last {LAST} "
        "epochs; the line joins the recipes no other beats with fewer parameters. "
        + smallest_holding(results, summaries, confirmed if confirmation_dir is not None else None),
        "",
        f"![accuracy per parameter]({link}/frontier.png)",
        "",
    ]
    if evaluated is None:
        lines.append(
            f"No evaluation of `{evaluated_run}` yet, so no `misclassified.png` and `confusion.png`: make "
            f"it with `jax-mnist evaluate {Path(study_dir).as_posix()}/{evaluated_run}`."
        )
    else:
        predictions, _ = evaluated
        lines += [
            f"The test images that `{evaluated_run}` gets wrong at epoch {predictions.epoch} "
            f"({len(predictions.misclassified_index)} of {len(predictions.label):,}), most confident first, "
            f"and its confusion matrix (`jax-mnist evaluate {Path(study_dir).as_posix()}/{evaluated_run}`):",
            "",
            f"![misclassified test images]({link}/misclassified.png)",
            f"![confusion matrix]({link}/confusion.png)",
        ]
    return "\n".join(lines) + "\n"


SCREENING_HEADER = [
    "candidate",
    "model",
    "params",
    "recipe: the nearest registered one + what differs",
    "epochs",
    "seeds",
    "validation % at the last epoch: mean ± std (min)",
    f"per seed: min validation % over the last {LAST} epochs",
    f"seeds ≥ {TARGET} in each of the last {LAST}",
    "train % at the last epoch (mean)",
    "wall minutes per seed (mean), device",
]


def screening_rows(results: Sequence[RecipeResult], summaries: dict) -> list[list[str]]:
    rows = []
    for res in results:
        base, differences = nearest_registered(res.runs[0].recipe)
        head = [
            f"`{res.name}`",
            f"`{res.model}`",
            f"{summaries[res.model].total_params:,}",
            f"`{base}` + {', '.join(differences)}" if differences else f"`{base}`",
            _epochs_cell(res),
            _seeds_cell(res),
        ]
        if not res.finished:
            rows.append(head + ["—"] * 5)
            continue
        last, minima = res.last, res.window_minima
        seconds = sum(seconds_per_seed_epoch(res.finished)) / len(res.finished)
        rows.append(
            head
            + [
                _last_epoch_cell(last),
                ", ".join(f"{m:.2f}" for m in minima),
                f"{res.held}/{len(res.finished)}",
                f"{statistics.mean(r.history[-1]['train_accuracy'] for r in res.finished):.2f}",
                f"{seconds / 60:.1f}, {_devices(res.finished)}",
            ]
        )
    return rows


def render_screening(study_dir: str | os.PathLike) -> str:
    """The validation figures of the screening runs under ``study_dir`` (``<candidate>/seed-<s>/``,
    each trained with ``--validation N``), as Markdown; no test figure is involved."""
    results = collect(read_runs(study_dir), split="val")
    if not results:
        raise ReportError(
            f"{study_dir}: no run scored on a validation split (train screening runs with --validation N)"
        )
    sizes = sorted({r.validation for res in results for r in res.runs})
    summaries = {res.model: summarize(res.model) for res in results}
    return (
        "\n".join(
            [
                f"Made by `jax-mnist report {Path(study_dir).as_posix()} --screening` from `config.json` and "
                "`metrics.jsonl` of each run directory (nothing typed in). Validation accuracy is over the "
                f"{' / '.join(f'{n:,}' for n in sizes)} training examples each run held out (the same "
                "examples for every seed and candidate: `jax_mnist.data.validation_indices`); these runs "
                "never scored the test set. Figures are over the finished seeds only.",
                "",
                *_markdown_table(SCREENING_HEADER, screening_rows(results, summaries)),
            ]
        )
        + "\n"
    )


def smallest_holding(
    results: Sequence[RecipeResult],
    summaries: dict,
    confirmed: Sequence[RecipeResult] | None = None,
    seeds: int = 5,
) -> str:
    """One sentence: the recipe with the fewest parameters that holds the target on all of at
    least ``seeds`` finished seeds (the study's headline question), from the runs; with
    ``confirmed`` (the confirmation seeds' results), what it held there."""
    holding = [r for r in results if len(r.finished) >= seeds and r.held == len(r.finished)]
    if not holding:
        return (
            f"No recipe holds ≥ {TARGET} % in each of its last {LAST} epochs on all of {seeds} or more "
            "finished seeds yet."
        )
    best = min(holding, key=lambda r: (summaries[r.model].total_params, r.name))
    sentence = (
        f"The smallest net that holds ≥ {TARGET} % test accuracy in each of its last {LAST} epochs on "
        f"every seed run ({len(best.finished)} of {len(best.finished)}, {seeds} or more): `{best.model}` "
        f"({summaries[best.model].total_params:,} parameters), recipe `{best.name}`, last epoch "
        f"{statistics.mean(best.last):.2f} ± {_std(best.last):.2f}."
    )
    if confirmed is None:
        return sentence
    fresh = next((r for r in confirmed if r.name == best.name and r.finished), None)
    if fresh is None:
        return sentence + " It has no finished confirmation seed yet."
    return sentence + (
        f" On its confirmation seeds ({_seed_list([r.seed for r in fresh.finished])}, never used for any "
        f"choice) it holds on {fresh.held}/{len(fresh.finished)}, last epoch "
        f"{statistics.mean(fresh.last):.2f} ± {_std(fresh.last):.2f}."
    )


def _evaluated(study_dir, evaluated_run: str):
    _, path = evaluation_paths(Path(study_dir) / evaluated_run, "last")
    return (read_predictions(path), path) if path.exists() else None


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    # No "Software" entry (matplotlib's version): the bytes depend on the inputs only.
    write_atomically(path, lambda f: figure.savefig(f, format="png", metadata={"Software": None}))


def _per_epoch(runs: Sequence[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and a (seeds, epochs) array of ``key`` over the finished runs (of equal length)."""
    length = min(len(r.history) for r in runs)
    values = np.array([[row[key] for row in r.history[:length]] for r in runs])
    return np.arange(1, length + 1), values


def accuracy_limits(curves: Sequence[np.ndarray], target: float = 99.4) -> tuple[float, float]:
    """y-limits that show the second half of every curve (where runs settle) and the target line:
    a long study zooms in on 99.x, a short or weak run gets the range its values are in."""
    tails = [c[..., c.shape[-1] // 2 :] for c in curves if c.size]
    if not tails:
        return target - 1.0, min(100.0, target + 0.5)
    low = min(float(np.min(t)) for t in tails + [np.array([target])])
    high = max(float(np.max(t)) for t in tails + [np.array([target])])
    margin = max(0.1, 0.08 * (high - low))
    return max(0.0, low - margin), min(100.0, high + margin)


def _plot_band(axes, epochs, values: np.ndarray, colour, label: str, style: str = "-") -> None:
    """The seeds' mean per epoch as a line, their min to max as a band around it."""
    axes.plot(epochs, values.mean(0), color=colour, ls=style, lw=1.6, label=label)
    axes.fill_between(epochs, values.min(0), values.max(0), color=colour, alpha=0.15, lw=0)


def _finish_accuracy_axes(axes, shown: list[np.ndarray], title: str, ylabel: str) -> None:
    axes.axhline(TARGET, color="black", ls="--", lw=1)
    axes.set(title=title, xlabel="epoch", ylabel=ylabel, ylim=accuracy_limits(shown, TARGET))


ORIGINAL_NINE = WALK[:-1]  # the original's eight models and its final recipe


def _curve_panel(axes, results: Sequence[RecipeResult], title: str) -> None:
    """Test accuracy per epoch of ``results``, one colour (and, past ten, one dash) per recipe."""
    shown = []
    for i, res in enumerate(r for r in results if r.finished):
        epochs, values = _per_epoch(res.finished, "test_accuracy")
        shown.append(values)
        style = "-" if i < 10 else "--"
        _plot_band(axes, epochs, values, f"C{i % 10}", f"{res.name} ({len(values)} seeds)", style)
    _finish_accuracy_axes(axes, shown, title, "test accuracy (%)")
    if shown:
        # Below the panel, not over the curves.
        axes.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    axes.grid(alpha=0.3)


def draw_curves(results: Sequence[RecipeResult], path: Path) -> None:
    """Three panels: the original's nine recipes; this project's; train vs test of the two final
    recipes. Each recipe: the seeds' mean test accuracy per epoch, a band from min to max."""
    figure = _figure(13, 12)
    grid = figure.add_gridspec(2, 2, height_ratios=[1.7, 1])
    original_axes, ours_axes = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    final_axes = figure.add_subplot(grid[1, :])
    _curve_panel(
        original_axes, [r for r in results if r.name in ORIGINAL_NINE], "The original's nine recipes"
    )
    _curve_panel(ours_axes, [r for r in results if r.name not in ORIGINAL_NINE], "This project's recipes")
    shown = []
    for i, res in enumerate(r for r in results if r.name in ("final", "final_onecycle") and r.finished):
        for key, style in (("train_accuracy", ":"), ("test_accuracy", "-")):
            epochs, values = _per_epoch(res.finished, key)
            shown.append(values)
            label = f"{res.name} {key.split('_')[0]}"
            _plot_band(final_axes, epochs, values, f"C{i}", label, style)
    _finish_accuracy_axes(
        final_axes, shown, "Final recipes: train (dotted; running, dropout on) vs test", "accuracy (%)"
    )
    if shown:
        final_axes.legend(fontsize=9, loc="lower right")
    final_axes.grid(alpha=0.3)
    figure.suptitle(
        f"Test accuracy per epoch: seed mean, band from min to max; dashed black: {TARGET} %", fontsize=12
    )
    figure.tight_layout()
    _save(figure, path)


def frontier_points(results: Sequence[RecipeResult], summaries: dict) -> list[dict]:
    """Per recipe with finished seeds: parameters, last-epoch accuracies, seeds holding, and
    whether it is on the frontier (no other recipe with no more parameters has a higher mean)."""
    points = [
        {
            "name": r.name,
            "params": summaries[r.model].total_params,
            "last": r.last,
            "mean": statistics.mean(r.last),
            "held": r.held,
            "seeds": len(r.finished),
        }
        for r in results
        if r.finished
    ]
    for p in points:
        p["frontier"] = not any(
            q is not p and q["params"] <= p["params"] and q["mean"] > p["mean"] for q in points
        )
    return sorted(points, key=lambda p: (p["params"], p["name"]))


def spread_positions(params: Sequence[int], step: float = 0.05, near: float = 0.03) -> list[float]:
    """x positions for points at ``params`` (in that order, sorted by size): recipes of equal or
    nearly equal size (a chain of counts each within ``near`` of the next) are set side by side,
    ``step`` apart on the log axis around the cluster's middle, instead of on top of each other."""
    order = sorted(range(len(params)), key=lambda i: params[i])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and params[i] <= params[clusters[-1][-1]] * (1 + near):
            clusters[-1].append(i)
        else:
            clusters.append([i])
    xs = [0.0] * len(params)
    for cluster in clusters:
        middle = math.exp(statistics.mean(math.log(params[i]) for i in cluster))
        for k, i in enumerate(cluster):
            xs[i] = middle * (1 + step) ** (k - (len(cluster) - 1) / 2)
    return xs


# The left panel of frontier.png shows the nets under this size (the study's range); larger ones
# (the original's models 1 and 2) are in its rows only.
FRONTIER_AXIS_PARAMS = 10_000


def draw_frontier(results: Sequence[RecipeResult], summaries: dict, path: Path) -> None:
    """Left: last-epoch test accuracy against parameters (log), each recipe numbered; right: the
    same numbers as rows, one dot per seed, so recipes of one parameter count stay apart."""
    figure = _figure(13, 7.5)
    axes, rows_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1]})
    points = frontier_points(results, summaries)
    number = {p["name"]: i + 1 for i, p in enumerate(points)}
    colour = {p["name"]: f"C{i % 10}" for i, p in enumerate(points)}
    small = [p for p in points if p["params"] < FRONTIER_AXIS_PARAMS]
    xs = spread_positions([p["params"] for p in small])
    for p, x in zip(small, xs):
        low, high = min(p["last"]), max(p["last"])
        axes.errorbar(
            x,
            p["mean"],
            yerr=[[p["mean"] - low], [high - p["mean"]]],
            fmt="o",
            color=colour[p["name"]],
            mfc=colour[p["name"]] if p["held"] else "white",
            ms=6,
            capsize=2,
            lw=1,
        )
        axes.annotate(
            str(number[p["name"]]),
            (x, high),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    on = [(p, x) for p, x in zip(small, xs) if p["frontier"]]
    if on:
        axes.plot(
            [x for _, x in on],
            [p["mean"] for p, _ in on],
            color="grey",
            lw=1,
            ls=":",
            zorder=0,
            label="frontier: no recipe with fewer parameters is better",
        )
    axes.axhline(TARGET, color="black", ls="--", lw=1, label=f"{TARGET} %")
    axes.set_xscale("log")
    ys = [np.array(p["last"]) for p in points]
    low, high = accuracy_limits(ys, TARGET)
    ylim = (min([low] + [float(y.min()) - 0.05 for y in ys]), high + 0.05)
    axes.set(
        title=f"Nets under {FRONTIER_AXIS_PARAMS:,} parameters (mean, bar: min to max;\nhollow: no seed "
        "holds; nearly equal sizes side by side)",
        xlabel="trainable parameters (log scale)",
        ylabel="test accuracy at the last epoch (%)",
        ylim=ylim,
    )
    axes.title.set_size(10)
    axes.legend(fontsize=9, loc="lower right")
    axes.grid(alpha=0.3, which="both")
    # The rows: one per recipe, fewest parameters at the top.
    for row, p in enumerate(points):
        rows_axes.scatter(p["last"], [row] * len(p["last"]), s=12, color=colour[p["name"]], alpha=0.6)
        rows_axes.plot(
            [p["mean"]],
            [row],
            marker="|",
            ms=14,
            mew=2,
            color=colour[p["name"]],
        )
    rows_axes.axvline(TARGET, color="black", ls="--", lw=1)
    rows_axes.set_yticks(
        range(len(points)),
        [
            f"{i + 1}. {p['name']} ({p['params']:,}): {p['held']}/{p['seeds']}"
            + (" ✓" if p["held"] == p["seeds"] and p["seeds"] >= 5 else "")
            for i, p in enumerate(points)
        ],
        fontsize=8.5,
    )
    rows_axes.set_ylim(len(points) - 0.5, -0.5)
    rows_axes.set_xlim(*ylim)
    rows_axes.set(
        title=f"Every recipe: each seed's last epoch (dot), the mean (bar);\nafter the colon: seeds ≥ "
        f"{TARGET} % in each of the last {LAST} epochs (✓: all of ≥ 5)",
        xlabel="test accuracy at the last epoch (%)",
    )
    rows_axes.title.set_size(10)
    rows_axes.yaxis.tick_right()
    rows_axes.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    _save(figure, path)


def draw_misclassified(predictions, title: str, path: Path, columns: int = 12, max_images: int = 96) -> None:
    shown = min(len(predictions.misclassified_index), max_images)
    rows = max(1, -(-shown // columns))
    figure = _figure(columns * 1.0, rows * 1.15 + 0.5)
    axes = figure.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= shown:
            continue
        index = predictions.misclassified_index[k]
        predicted = int(predictions.predicted[index])
        ax.imshow(predictions.misclassified_images[k, :, :, 0], cmap="gray", vmin=0, vmax=255)
        confidence = predictions.probabilities[index, predicted]
        ax.set_title(f"{predictions.label[index]}→{predicted} {confidence:.2f}", fontsize=8)
    if shown == 0:
        axes[0, 0].text(0, 0.5, "no test image misclassified", fontsize=10)
    figure.suptitle(title + " (true→predicted, probability of the prediction)", fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def draw_confusion(predictions, title: str, path: Path) -> None:
    matrix = predictions.confusion
    off_diagonal = np.where(np.eye(10, dtype=bool), 0, matrix)
    figure = _figure(6.4, 5.6)
    ax = figure.subplots()
    image = ax.imshow(off_diagonal, cmap="Reds", vmin=0, vmax=max(1, int(off_diagonal.max())))
    for true in range(10):
        for predicted in range(10):
            count = matrix[true, predicted]
            if count:
                diagonal = true == predicted
                ax.text(
                    predicted,
                    true,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black"
                    if diagonal or off_diagonal[true, predicted] < off_diagonal.max() / 2
                    else "white",
                    weight="bold" if diagonal else "normal",
                )
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title=title)
    figure.colorbar(image, ax=ax, label="errors (off the diagonal)")
    figure.tight_layout()
    _save(figure, path)


def write_figures(
    study_dir: str | os.PathLike, out_dir: str | os.PathLike, evaluated_run: str = DEFAULT_EVALUATED_RUN
) -> list[Path]:
    results = collect(read_runs(study_dir))  # a missing study is an error before anything is made
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{out}: cannot create the directory ({e.strerror})") from None
    written = [out / "curves.png", out / "frontier.png"]
    draw_curves(results, written[0])
    draw_frontier(results, {res.model: summarize(res.model) for res in results}, written[1])
    evaluated = _evaluated(study_dir, evaluated_run)
    if evaluated is not None:
        predictions, _ = evaluated
        errors = len(predictions.misclassified_index)
        draw_misclassified(
            predictions,
            f"{evaluated_run}, epoch {predictions.epoch}: {errors} errors",
            out / "misclassified.png",
        )
        draw_confusion(predictions, f"{evaluated_run}, epoch {predictions.epoch}", out / "confusion.png")
        written += [out / "misclassified.png", out / "confusion.png"]
    return written


# --------------------------------------------------------------------------- README


def paste_into(document: str, section: str, where: str = "README", markers=MARKERS) -> str:
    """``document`` with the text between the two ``markers`` lines replaced by ``section``."""
    start, end = markers
    if document.count(start) != 1 or document.count(end) != 1 or document.index(start) > document.index(end):
        raise ReportError(f"{where}: expected one line {start!r} and, after it, one line {end!r}")
    before, rest = document.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{section}{end}{after}"


def pasted_section(document: str, where: str = "README", markers=MARKERS) -> str:
    """The text between the markers (what ``paste_into`` put there)."""
    start, end = markers
    if document.count(start) != 1 or document.count(end) != 1:
        raise ReportError(f"{where}: expected one line {start!r} and one line {end!r}")
    return document.split(start, 1)[1].split(end, 1)[0].removeprefix("\n")
