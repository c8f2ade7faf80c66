"""A search over recipe fields, on Optuna: every trial a screening run directory, resumable,
shared by any number of worker processes.

``jax-mnist search --recipe R --space FIELD=V1,V2 ... --out DIR`` asks Optuna for the next trial's
values (a grid over every combination, or TPE), trains the recipe with them into
``DIR/trial-<n>/seed-<s>/`` (an ordinary run directory, named as ``jax-mnist report DIR
--screening`` reads it) and tells Optuna the trial's score: the lowest validation accuracy over
its last three epochs (what "held" asks of a recipe). Optuna keeps the study in a journal file,
``DIR/optuna-journal.log``; ``DIR/search.json`` states what the search is, so a second command on
the same DIR with other settings is refused before anything is written.

Workers: each trial is held through an ``fcntl`` lock in its directory while it trains, so the same
command run again (or in a second process on the same file system) continues the trials nobody
holds (an interrupted one resumes from its checkpoints) and then asks for new ones, until the
study has ``trials`` trials. A trial whose training diverges (non-finite loss) is recorded as
failed and the search goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jax_mnist.data import Mnist
from jax_mnist.errors import ConfigError, JaxMnistError
from jax_mnist.files import write_atomically
from jax_mnist.recipes import Recipe, parse_value, with_overrides
from jax_mnist.run import NonFiniteLoss, train
from jax_mnist.rundir import RunError, locked

JOURNAL = "optuna-journal.log"
DESCRIPTION = "search.json"
STUDY_NAME = "search"
SAMPLERS = ("grid", "tpe")
HELD_EPOCHS = 3  # a trial's score: its lowest validation accuracy over this many last epochs
PRUNE_FROM_EPOCH = 4  # --prune: Optuna's median rule, from this epoch on (epochs are its steps)
MAX_COMBINATIONS = 100_000  # every combination is checked before the search starts
# Fields a search may not vary: the name is the trial's own, the split is the search's.
FIXED_FIELDS = ("name", "validation")


class SearchError(JaxMnistError):
    """A search that cannot start or continue as asked; the message says why."""


class _Pruned(Exception):
    """Raised after an epoch Optuna's pruner stops: the trial's run ends there."""


def parse_space(base: Recipe, specs: Sequence[str]) -> dict[str, list]:
    """``FIELD=V1,V2,...`` options as field -> its values, each parsed and checked by the recipe
    (a bad field or value is one ``SearchError`` line); every combination is a valid recipe."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    space: dict[str, list] = {}
    for spec in specs:
        field, sep, text = spec.partition("=")
        field = field.strip()
        if not sep or not field or not text.strip():
            raise SearchError(f"--space takes FIELD=V1,V2,..., found {spec!r}")
        if field in FIXED_FIELDS:
            raise SearchError(f"--space {spec}: {field} is set by the search itself, not searched")
        if field not in fields:
            raise SearchError(
                f"--space {spec}: unknown recipe field {field!r}; valid: "
                f"{', '.join(sorted(fields - set(FIXED_FIELDS)))}"
            )
        if field in space:
            raise SearchError(f"--space names {field} twice; give all its values in one --space")
        texts = [t.strip() for t in text.split(",")]
        if any(not t for t in texts):
            raise SearchError(f"--space {spec}: an empty value")
        values = []
        for t in texts:
            try:
                values.append(parse_value(field, t))
            except ConfigError as e:
                raise SearchError(f"--space {spec}: {e}") from None
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise SearchError(f"--space {spec}: value(s) {', '.join(repeated)} given more than once")
        space[field] = values
    if not space:
        raise SearchError("give at least one --space FIELD=V1,V2,...")
    combinations = math.prod(len(v) for v in space.values())
    if combinations > MAX_COMBINATIONS:
        raise SearchError(f"the space has {combinations:,} combinations, more than {MAX_COMBINATIONS:,}")
    for values in itertools.product(*space.values()):
        try:
            with_overrides(base, dict(zip(space, values)))
        except ConfigError as e:
            shown = ", ".join(f"{k}={v}" for k, v in zip(space, values))
            raise SearchError(f"--space: the combination {shown} is not a valid recipe: {e}") from None
    return space


@dataclasses.dataclass(frozen=True)
class Search:
    """What a search is: the same for every worker and every continuation (``DIR/search.json``)."""

    base: Recipe  # the recipe searched around, its validation split and epochs set
    space: Mapping[str, list]
    trials: int
    sampler: str = "grid"
    seed: int = 11  # every trial's training seed, and the sampler's
    train_examples: int | None = None
    prune: bool = False

    def description(self) -> dict:
        """What the search is (its trials' recipes and sampler); how many trials to run is not part
        of it: the same command with a larger --trials goes on with the same study."""
        return {
            "recipe": dataclasses.asdict(self.base),
            "space": {k: list(v) for k, v in self.space.items()},
            "sampler": self.sampler,
            "seed": self.seed,
            "train_examples": self.train_examples,
            "prune": self.prune,
        }

    @property
    def combinations(self) -> int:
        return math.prod(len(v) for v in self.space.values())


def make_search(
    base: Recipe,
    space: Mapping[str, list],
    trials: int | None,
    sampler: str = "grid",
    seed: int = 11,
    train_examples: int | None = None,
    prune: bool = False,
    allow_test: bool = False,
) -> Search:
    """A checked ``Search`` (one ``SearchError`` line for a bad setting)."""
    if sampler not in SAMPLERS:
        raise SearchError(f"--sampler must be grid or tpe, found {sampler!r}")
    if base.validation == 0 and not allow_test:
        raise SearchError(
            "a search scores its trials: give --validation N to hold N training examples out "
            "(the test set stays unseen), or --score-test to score on the test set knowingly"
        )
    combinations = math.prod(len(v) for v in space.values())
    if trials is None:
        if sampler != "grid":
            raise SearchError("--trials N is needed with --sampler tpe")
        trials = combinations
    if trials < 1:
        raise SearchError(f"--trials must be at least 1, found {trials}")
    if sampler == "grid" and trials > combinations:
        raise SearchError(f"--trials {trials}: the grid has only {combinations} combination(s)")
    return Search(base, dict(space), trials, sampler, seed, train_examples, prune)


def trial_name(number: int) -> str:
    return f"trial-{number:03d}"


def trial_score(history: Sequence[dict]) -> float:
    """The lowest scored accuracy (validation, else test) over the last ``HELD_EPOCHS`` epochs."""
    split = "val" if "val_accuracy" in history[-1] else "test"
    return min(row[f"{split}_accuracy"] for row in history[-HELD_EPOCHS:])


# --------------------------------------------------------------------------- the study


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    return optuna


def _sampler(search: Search):
    optuna = _quiet_optuna()
    if search.sampler == "grid":

        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values) -> None:
                """Nothing: GridSampler's own calls ``Study.stop``, which only works inside
                ``Study.optimize``; a search stops by its count of trials instead."""

        return Grid(dict(search.space), seed=search.seed)
    return optuna.samplers.TPESampler(seed=search.seed)


def _distributions(search: Search) -> dict:
    optuna = _quiet_optuna()
    return {k: optuna.distributions.CategoricalDistribution(v) for k, v in search.space.items()}


def open_study(search: Search, out: Path):
    """The search's Optuna study in ``out`` (created with its description on first use; refused
    when ``out`` holds another search or something else)."""
    optuna = _quiet_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    description = search.description()
    described = out / DESCRIPTION
    if described.exists():
        try:
            found = json.loads(described.read_text())
        except (OSError, ValueError) as e:
            raise SearchError(f"{described}: unreadable ({e}); nothing was changed") from None
        if found != description:
            differ = sorted(
                k for k in description if not isinstance(found, dict) or found.get(k) != description[k]
            )
            raise SearchError(
                f"{out} holds another search (it differs in: {', '.join(differ)}; see {described}); "
                "choose another --out, or run the search as it was started"
            )
    elif out.exists() and any(out.iterdir()):
        raise SearchError(f"{out} is not empty and holds no search ({DESCRIPTION}): choose another --out")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SearchError(f"{out}: cannot create the search directory ({e.strerror})") from None
        write_atomically(described, json.dumps(description, indent=2) + "\n")
    storage = JournalStorage(JournalFileBackend(str((out / JOURNAL).absolute())))
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        sampler=_sampler(search),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=PRUNE_FROM_EPOCH)
        if search.prune
        else optuna.pruners.NopPruner(),
        direction="maximize",
        load_if_exists=True,
    )


@contextlib.contextmanager
def _held(trial_dir: Path):
    """Whether this process holds the trial for the block (False: another live process does)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(trial_dir))
            mine = True
        except RunError as e:
            if "is in use by process" not in str(e):
                raise
            mine = False
        yield mine


def run_search(
    search: Search,
    data: Mnist,
    out: str | os.PathLike,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train trials until the study has ``search.trials`` of them: first those left running by a
    process that stopped (nobody holds them), then new ones. Returns a row per trial this process
    finished: number, params, state, score."""
    out = Path(out)
    study = open_study(search, out)
    done: list[dict] = []
    optuna = _quiet_optuna()
    state = optuna.trial.TrialState
    while True:
        trials = study.get_trials(deepcopy=False)
        orphans = [t for t in trials if t.state == state.RUNNING]
        progressed = False
        for frozen in orphans:
            with _held(out / trial_name(frozen.number)) as mine:
                if not mine:
                    continue
                # Another worker may have finished it between the listing and the lock.
                if study.get_trials(deepcopy=False)[frozen.number].state != state.RUNNING:
                    continue
                trial = optuna.trial.Trial(study, frozen._trial_id)
                done.append(_train_trial(search, study, trial, frozen.params, data, out, log, resume=True))
                progressed = True
        if progressed:
            continue
        if len(study.get_trials(deepcopy=False)) >= search.trials:
            running = [t.number for t in study.get_trials(deepcopy=False) if t.state == state.RUNNING]
            if running:
                log(f"search: all {search.trials} trials started; trial(s) {running} still train elsewhere")
            return done
        trial = study.ask(_distributions(search))
        with _held(out / trial_name(trial.number)) as mine:
            if mine:  # else a worker that saw it running before this one locked it trains it
                done.append(_train_trial(search, study, trial, trial.params, data, out, log, resume=False))


def _train_trial(
    search: Search, study, trial, params: dict, data: Mnist, out: Path, log, resume: bool
) -> dict:
    optuna = _quiet_optuna()
    name = trial_name(trial.number)
    recipe = dataclasses.replace(search.base, name=name, **params)
    run_dir = out / name / f"seed-{search.seed}"
    resume = resume and (run_dir / "config.json").exists()
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    log(f"search: {name} ({shown}) {'continues' if resume else 'starts'} -> {run_dir}")

    def report(row: dict) -> None:
        trial.report(row.get("val_accuracy", row.get("test_accuracy")), row["epoch"])
        if search.prune and row["epoch"] < recipe.epochs and trial.should_prune():
            raise _Pruned

    try:
        history = train(
            recipe,
            data,
            run_dir,
            seed=search.seed,
            resume=resume,
            train_examples=search.train_examples,
            log=log,
            on_epoch_end=report,
        )
    except _Pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log(f"search: {name} pruned by the median rule (its checkpoints are kept)")
        return {"number": trial.number, "params": params, "state": "pruned", "score": None}
    except NonFiniteLoss as e:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log(f"search: {name} failed: {e}")
        return {"number": trial.number, "params": params, "state": "failed", "score": None}
    score = trial_score(history)
    study.tell(trial, score)
    window = min(HELD_EPOCHS, len(history))
    log(f"search: {name} scored {score:.2f} (its lowest accuracy over the last {window} epoch(s))")
    return {"number": trial.number, "params": params, "state": "complete", "score": score}
