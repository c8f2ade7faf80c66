"""The run directory: one owner for its files, reading that never changes it, epochs committed once.

Layout (one seed):
- ``config.json``: the run's identity (resolved recipe, seed, training-set size) plus the
  versions that wrote it (jax-mnist's among them), the code (``jax_mnist.provenance``: git commit,
  whether the package differed from it, the recipe schema version), the device, and which
  accuracy ``best/`` is chosen by (``best_checkpoint``: test, or validation in a screening run);
- ``checkpoints/<epoch>/``: orbax checkpoints of the last two epochs, each with three items:
  ``weights`` (params, batch_stats), ``rest`` (step, optimizer state) and ``record`` (JSON: the
  history of every epoch up to this one, the sha256 of the two array items, the versions);
  orbax writes a step into a temporary directory and renames it when it is complete, so that
  rename commits the epoch: its metrics row and its weights become visible together;
- ``metrics.jsonl``: one JSON object per committed epoch, rewritten after each commit (a copy of
  the newest record's history, for readers that read no checkpoint);
- ``events.out.tfevents.epoch-<N>.jax-mnist``: TensorBoard's event file of each committed epoch
  (``jax_mnist.events``), written after ``metrics.jsonl``;
- ``best/<epoch>/``: a checkpoint as in ``checkpoints/``, of the epoch with the best test
  accuracy so far (validation accuracy in a run with a validation split);
- ``quarantine/``: checkpoints a training could not use (bytes that fail their digest or do
  not decode), moved there with the ``metrics.jsonl`` of that moment, never deleted;
- ``.lock``: locked (``fcntl.flock``) by the process training in the directory; the pid inside
  is only for the message;
- ``digests.json``: only in runs written before checkpoint format 2 (one ``default`` item per
  checkpoint, its digest kept here).

The checkpoints themselves (formats, digests, what is a mismatch and what is corruption) are
``jax_mnist.checkpoints``.

``RunDir`` is the writer: it checks, locks, restores, commits epochs and closes. Everything else
here reads, and reading (``load_run``, ``read_run``, ``read_history``) never deletes, moves or
rewrites anything. A checkpoint whose tree does not fit the current code is a ``TreeMismatch``
(one line: what differs, which versions wrote and read it), not corruption: nothing is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jax_mnist import events, library_output
from jax_mnist.checkpoints import (
    FORMAT,
    CheckpointStore,
    CheckpointVanished,
    CorruptCheckpoint,
    UnverifiedCheckpoint,
    committed_epochs,
    versions,
)
from jax_mnist.data import validation_digest
from jax_mnist.distill import Teacher, TeacherError, weights_digest
from jax_mnist.engine import TrainState, make_model, state_like
from jax_mnist.errors import JaxMnistError
from jax_mnist.files import write_atomically
from jax_mnist.layers import resolve_conv_impl
from jax_mnist.provenance import code_provenance
from jax_mnist.recipes import Recipe
from jax_mnist.schema import check_config, check_metrics_row
from jax_mnist.zoo import get_model, init_variables

MNIST_TRAIN_EXAMPLES = 60_000


class RunError(JaxMnistError, ValueError):
    """A run that cannot start or go on (bad arguments, a foreign --out, non-finite loss)."""


# --------------------------------------------------------------------------- identity

# Fields whose change leaves the numbers of the epochs already run as they were, when the
# schedule does not depend on the number of epochs (OneCycle does): a finished run can be extended.
_EXTENDABLE = {"recipe.epochs"}


def run_identity(
    recipe: Recipe,
    seed: int,
    train_examples: int,
    training_split: int = MNIST_TRAIN_EXAMPLES,
    teacher: Teacher | None = None,
) -> dict:
    """What must match for a run directory to be resumed (everything that changes the numbers).

    ``train_examples``: the examples trained on; ``training_split``: the size of the training split
    the recipe's validation examples are held out of (stated, with their digest, when it has any);
    ``teacher``: the recipe's loaded teacher (read from its run directory when not given).
    """
    identity = {"recipe": dataclasses.asdict(recipe), "seed": seed, "train_examples": train_examples}
    if recipe.validation:
        identity["validation_split"] = {
            "examples": recipe.validation,
            "held_out_of": training_split,
            "indices": f"floor(i * {training_split} / {recipe.validation}) for i = 0 .. "
            f"{recipe.validation - 1}, of the training split in its order (the same for every seed)",
            "sha256": validation_digest(training_split, recipe.validation),
        }
    if recipe.teacher:
        teacher = teacher or load_teacher(recipe, "cpu")
        identity["teacher"] = teacher.record  # which run, epoch and weights taught
    return identity


def scored_split(row: dict) -> str:
    """The split an epoch row was scored on: "val" (a screening run's validation split) or "test"."""
    return "val" if "val_accuracy" in row else "test"


def scored_accuracy(row: dict) -> float:
    """The accuracy an epoch is judged by (the best checkpoint): validation when the run has it."""
    return row[f"{scored_split(row)}_accuracy"]


_RECIPE_DEFAULTS = {
    f"recipe.{f.name}": f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING
}


def _flat(identity: dict) -> dict[str, Any]:
    recipe = identity.get("recipe")
    flat = {f"recipe.{k}": v for k, v in recipe.items()} if isinstance(recipe, dict) else {}
    flat.update({k: v for k, v in identity.items() if k != "recipe"})
    return flat


def identity_differences(found: dict, asked: dict) -> dict[str, tuple[Any, Any]]:
    """field -> (value in the directory, value asked for), for every field that differs. A recipe
    field added after the run was made counts as its default (which is what that run used)."""
    old, new = _flat(found), _flat(asked)
    if isinstance(found.get("recipe"), dict):
        old = {**_RECIPE_DEFAULTS, **old}
    if isinstance(asked.get("recipe"), dict):
        new = {**_RECIPE_DEFAULTS, **new}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def device(conv_impl: str = "auto") -> dict[str, object]:
    """The devices a run computes on, and how its convolutions are lowered there (``conv_impl``:
    the recipe's; "auto" resolves per platform and per what is installed, so it is recorded)."""
    first = jax.devices()[0]
    return {
        "platform": first.platform,
        "kind": first.device_kind,
        "count": jax.device_count(),
        "conv_impl": resolve_conv_impl(conv_impl, first.platform, jax.device_count()),
    }


# --------------------------------------------------------------------------- reading files


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line that is not one of our epoch rows is an error naming it."""
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except OSError as e:
        raise RunError(f"{path}: unreadable ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not text (byte {e.start} is not UTF-8)") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise RunError(f"{path}, line {number}: not JSON: {line[:60]!r}") from None
        rows.append(check_metrics_row(f"{path}, line {number}", row))
    return rows


def write_metrics(path: Path, rows: list[dict]) -> None:
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))


def non_finite_fields(row: dict) -> list[str]:
    """The numbers of an epoch row that are NaN or infinite."""
    return [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]


# --------------------------------------------------------------------------- a run as data


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run directory as recorded on disk: its config and its history (one row per epoch).

    The one record type of a run: training, the study and the report all read runs as this."""

    out: Path
    config: dict
    history: list[dict]

    @property
    def recipe(self) -> Recipe:
        return Recipe(**self.config["recipe"])

    @property
    def recipe_name(self) -> str:
        return str(self.config["recipe"]["name"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def train_examples(self) -> int:
        return int(self.config["train_examples"])

    @property
    def epochs(self) -> int:
        """The epochs the run was configured for."""
        return int(self.config["recipe"]["epochs"])

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.epochs

    @property
    def validation(self) -> int:
        """Training examples the run held out as its validation split (0: none, scored on the test set)."""
        return int(self.config["recipe"].get("validation", 0))

    @property
    def scored_split(self) -> str:
        """ "val" for a run with a validation split (its rows hold no test figures), else "test"."""
        return "val" if self.validation else "test"

    def accuracies(self, split: str = "test") -> list[float]:
        """``split``'s accuracy (%) per epoch: "test", or "val" in a screening run ([] for a split
        the run does not score)."""
        return [row[f"{split}_accuracy"] for row in self.history if f"{split}_accuracy" in row]

    @property
    def test_accuracies(self) -> list[float]:
        return self.accuracies("test")

    @property
    def identity(self) -> dict:
        """What makes two seeds samples of one experiment: the whole recipe (its fields added
        later at their defaults) and the data, everything but the seed."""
        recipe = {
            k.removeprefix("recipe."): v
            for k, v in {**_RECIPE_DEFAULTS, **_flat(self.config)}.items()
            if k.startswith("recipe.")
        }
        return {"recipe": recipe, "train_examples": self.train_examples}


def read_run(out_dir: str | os.PathLike) -> RunRecord:
    """The config and history of a run directory (read only; errors name the file)."""
    out = Path(out_dir)
    if not out.exists():
        raise RunError(f"{out}: no such directory")
    if not out.is_dir():
        raise RunError(f"{out}: not a directory")
    config_path = out / "config.json"
    if not config_path.exists():
        raise RunError(f"{out}: not a jax-mnist run directory (no config.json)")
    config = check_config(str(config_path), read_json(config_path))
    return RunRecord(out, config, read_history(out))


def read_history(out: Path) -> list[dict]:
    """The committed epochs: ``metrics.jsonl``, or the newest checkpoint's record when a training
    stopped between committing an epoch and rewriting ``metrics.jsonl`` (read only)."""
    rows = read_metrics(out / "metrics.jsonl")
    newest = max(committed_epochs(out / "checkpoints"), default=0)
    if newest <= len(rows):
        return rows
    store = CheckpointStore(out, "checkpoints")
    try:
        record = store.record(newest)
    finally:
        store.close()
    history = record.get("history") if record else None
    if isinstance(history, list) and [r.get("epoch") for r in history] == list(range(1, len(history) + 1)):
        if history[: len(rows)] == rows:
            return history
    return rows


# --------------------------------------------------------------------------- lock


@contextlib.contextmanager
def locked(out: Path):
    """Hold ``out/.lock`` (``fcntl.flock``) while the block runs; a directory locked by a live
    process is refused. The kernel drops the lock of a process that dies, so a lock file left by
    kill -9 is simply taken; the pid inside is only for the message."""
    lock = out / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise RunError(f"{lock}: cannot create the lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(
                f"{out} is in use by process {holder} (lock {lock}); wait for it or stop it"
            ) from None
        try:  # the holder we raced with may have removed the file: only the file at the path counts
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with contextlib.suppress(OSError):  # a full disk: the pid is only for the message
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


# --------------------------------------------------------------------------- reading a run


@dataclasses.dataclass(frozen=True)
class Run(RunRecord):
    """A run directory with the weights of one checkpoint: what ``load_run`` returns.

    ``state`` is an ``engine.TrainState`` with ``step``, ``params`` and ``batch_stats``; its
    ``opt_state`` is None (reading a run restores the weights only)."""

    epoch: int = 0  # the epoch whose weights these are
    state: Any = None

    @property
    def variables(self) -> dict:
        return {"params": self.state.params, "batch_stats": self.state.batch_stats}


def weights_like(recipe: Recipe) -> dict:
    """The shapes and dtypes of ``{'params', 'batch_stats'}`` of ``recipe``'s network."""
    model = get_model(recipe.model)
    return jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0))


def load_run(
    out_dir: str | os.PathLike, checkpoint: str | int = "last", warn: Callable[[str], None] | None = None
) -> Run:
    """A finished or interrupted run: its recipe, seed, metrics, and the verified weights of
    ``checkpoint``: "last" (the newest good checkpoint), "best" (best test accuracy; best validation
    accuracy in a run with a validation split) or an epoch.

    Read only: a checkpoint that fails its digest (or, in an older run, has none) is reported
    through ``warn`` and stepped over for "last", an error otherwise; nothing is deleted or moved.
    A checkpoint that does not fit this code's network is a ``TreeMismatch``."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    record = read_run(out_dir)
    like = weights_like(record.recipe)
    kind = "best" if checkpoint == "best" else "checkpoints"
    for attempt in range(3):  # a training may rotate a checkpoint away while it is read
        store = CheckpointStore(record.out, kind)
        try:
            epoch, weights, step = _pick(store, checkpoint, like, record, warn)
            break
        except CheckpointVanished:
            if attempt == 2:
                raise RunError(
                    f"{store.directory}: checkpoints were removed while they were read three times: "
                    "a training is running in this directory; try again when it has finished"
                ) from None
        finally:
            store.close()
    state = TrainState(
        step=np.int32(step), params=weights["params"], batch_stats=weights["batch_stats"], opt_state=None
    )
    return Run(record.out, record.config, record.history, epoch=epoch, state=state)


def _pick(store: CheckpointStore, checkpoint, like, record: RunRecord, warn) -> tuple[int, dict, int]:
    epochs = store.epochs()
    if checkpoint in ("best", "last"):
        if not epochs:
            raise RunError(f"{store.directory}: no {'best ' if checkpoint == 'best' else ''}checkpoint")
        candidates = list(reversed(epochs))
    else:
        epoch = int(checkpoint)
        if epoch not in epochs:
            raise RunError(f"{store.directory}: no checkpoint of epoch {epoch}; found {epochs}")
        candidates = [epoch]
    for epoch in candidates:
        try:
            weights, step = store.restore_weights(
                epoch, like, record.config, lambda: state_like(record.recipe, record.train_examples)
            )
            return epoch, weights, step
        except (CorruptCheckpoint, UnverifiedCheckpoint) as e:
            if len(candidates) == 1 or checkpoint != "last":
                raise
            library_output.show_detail(e, f"the checkpoint of epoch {epoch}")
            warn(f"{e}; skipped (left as it is); trying the checkpoint before it")
    raise RunError(
        f"{store.directory}: no checkpoint that restores and verifies (epochs {epochs}); nothing was changed"
    )


def load_teacher(recipe: Recipe, platform: str) -> Teacher | None:
    """The teacher run ``recipe`` names (None when it names none), checked and verified, its
    network lowered for ``platform``; read only. A run that cannot teach this recipe (missing,
    unfinished, or trained on the validation examples the recipe is scored on) is a TeacherError."""
    if not recipe.teacher:
        return None
    try:
        run = load_run(recipe.teacher, "last")
    except JaxMnistError as e:  # not a run, a malformed file, no checkpoint that verifies
        raise TeacherError(f"teacher {recipe.teacher}: {e}") from None
    if not run.finished:
        raise TeacherError(
            f"teacher {recipe.teacher}: unfinished ({len(run.history)} of {run.epochs} epochs); "
            "finish it first (jax-mnist train ... --resume)"
        )
    if recipe.validation and run.validation != recipe.validation:
        held = f"held out {run.validation:,}" if run.validation else "held out none"
        raise TeacherError(
            f"teacher {recipe.teacher}: {held} of the training examples, but this run is scored on "
            f"{recipe.validation:,} held-out ones: a teacher that trained on them would leak them; "
            f"train the teacher with --validation {recipe.validation}"
        )
    variables = jax.tree_util.tree_map(np.asarray, run.variables)
    record = {
        "run": str(recipe.teacher),
        "recipe": run.recipe_name,
        "model": run.recipe.model,
        "seed": run.seed,
        "epoch": run.epoch,
        "validation": run.validation,
        "weights_sha256": weights_digest(variables),
    }
    # Lowered for all devices, as the programs that run it are (several CPU devices: im2col).
    return Teacher(make_model(run.recipe, platform, jax.device_count()), variables, record)


# --------------------------------------------------------------------------- the writer


def check_run_dir(out: Path, identity: dict, resume: bool, schedule: str) -> dict | None:
    """Whether ``out`` may receive (or continue) the run of ``identity``; nothing is written.

    Returns the directory's config when it continues a run, None when the run starts afresh.
    """
    if not out.exists():
        if resume:
            raise RunError(
                f"{out}: no such run directory, so nothing to resume (drop --resume to start the run)"
            )
        return None
    if not out.is_dir():
        raise RunError(f"{out}: not a directory")
    config_path = out / "config.json"
    if not config_path.exists():
        if any(p.name != ".lock" for p in out.iterdir()):  # a lock file alone: a run killed at its start
            raise RunError(
                f"{out}: not empty and not a jax-mnist run (no config.json); refusing to write "
                "into it: choose another --out"
            )
        if resume:
            raise RunError(f"{out}: empty, so nothing to resume (drop --resume to start the run)")
        return None
    previous = read_json(config_path)
    started = bool(committed_epochs(out / "checkpoints")) or bool(read_metrics(out / "metrics.jsonl"))
    if not started:  # a run that stopped before its first checkpoint: nothing to lose, whatever its config
        return None
    check_config(str(config_path), previous)
    differences = identity_differences({k: previous.get(k) for k in identity}, identity)
    extending = set(differences) <= _EXTENDABLE and schedule != "onecycle"
    if differences and not (extending and differences["recipe.epochs"][1] >= differences["recipe.epochs"][0]):
        listed = "; ".join(f"{k}: {old!r} there, {new!r} asked" for k, (old, new) in differences.items())
        why = (
            " (a OneCycle schedule depends on the number of epochs, so more epochs is another run)"
            if set(differences) <= _EXTENDABLE
            else ""
        )
        raise RunError(
            f"{out} holds a different run ({listed}){why}; refusing to overwrite it: choose another --out"
        )
    if not resume:
        raise RunError(f"{out} already holds this run; pass --resume to continue it, or choose another --out")
    return previous


class RunDir:
    """One run directory opened for training: locked, its checkpoints verified, its history
    restored; ``commit_epoch`` records an epoch. The only code that writes a run directory."""

    def __init__(self, seed: int, out: Path, log: Callable[[str], None] = print, local: bool = True):
        self.seed, self.out, self.log = seed, Path(out), log
        self.history: list[dict] = []
        self.start_epoch = 0
        self.state = None  # the restored state of start_epoch (None: start from the seed's init)
        self.local = local  # False: a process of a multi-process run that holds no files
        self.recipe_fields: dict | None = None  # the hparams of the TensorBoard events
        self.last = CheckpointStore(self.out, "checkpoints", writable=True, keep=2) if local else None
        self.best = CheckpointStore(self.out, "best", writable=True, keep=1) if local else None

    @classmethod
    def elsewhere(cls, seed: int, out: Path, start_epoch: int) -> RunDir:
        """A seed's run as seen by a process other than the one writing its directory."""
        run = cls(seed, out, local=False)
        run.start_epoch = start_epoch
        return run

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, seed: int, out: Path, identity: dict, previous: dict | None, like, log: Callable[[str], None]
    ):
        """The run directory of one seed for the life of the block. ``previous``: its config
        (from ``check_run_dir``) when it continues a run; ``like``: the train state's structure."""
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"{out}: cannot create the run directory ({e.strerror})") from None
        with locked(out):
            run = cls(seed, out, log)
            run.recipe_fields = identity["recipe"]
            try:
                if previous is None:  # a new run (or one that stopped before its first checkpoint)
                    for leftover in ("metrics.jsonl", "digests.json"):  # they record no epoch
                        (out / leftover).unlink(missing_ok=True)
                    config = {**identity, "versions": versions(), "code": code_provenance()}
                    config["device"] = device(identity["recipe"]["conv_impl"])
                    split = "validation" if identity.get("validation_split") else "test"
                    config["best_checkpoint"] = f"best/ holds the epoch of best {split} accuracy"
                    write_atomically(out / "config.json", json.dumps(config, indent=2) + "\n")
                else:
                    run._resume(previous, identity, like)
                yield run
            finally:
                run.last.close()
                run.best.close()

    @property
    def best_accuracy(self) -> float:
        return max((scored_accuracy(row) for row in self.history), default=-math.inf)

    @property
    def last_epoch(self) -> int | None:
        """The newest committed epoch (None: none yet)."""
        return max(self.last.epochs(), default=None) if self.local else None

    def _note_another_lowering(self, previous: dict, identity: dict, epoch: int) -> None:
        """Says so when the epochs done ran with other convolutions than this process will (conv_impl
        "auto" resolves by what is installed): the same function, not the same bits."""
        recorded = previous.get("device") or {}
        asked = previous["recipe"].get("conv_impl", "auto")
        # Before 0.3.0 config.json did not record it, and "auto" was im2col on CPU, XLA elsewhere.
        auto_then = "im2col" if recorded.get("platform", "cpu") == "cpu" else "xla"
        was = recorded.get("conv_impl") or (auto_then if asked == "auto" else asked)
        now = device(identity["recipe"]["conv_impl"])["conv_impl"]
        if was != now:
            pin = " (JAX_MNIST_ONEDNN=0 makes conv_impl auto take im2col)" if was == "im2col" else ""
            self.log(
                f"note: epochs 1-{epoch} of {self.out} ran with {was} convolutions, the rest runs with "
                f"{now}: the same function in another rounding, so not bit-equal to an uninterrupted "
                f"run{pin}"
            )

    def _resume(self, previous: dict, identity: dict, like) -> None:
        """Continue from the newest checkpoint that restores and verifies. Those after it are moved
        to ``quarantine/`` (never deleted); a checkpoint that does not fit the code stops the run
        with nothing touched; a history the checkpoints cannot back is refused."""
        rows = read_metrics(self.out / "metrics.jsonl")
        unusable, found = [], None
        for epoch in reversed(self.last.epochs()):
            try:
                found = (epoch, *self.last.restore_state(epoch, like, previous))
                break
            except (CorruptCheckpoint, UnverifiedCheckpoint) as e:
                library_output.show_detail(e, f"the checkpoint of epoch {epoch}")
                unusable.append((epoch, str(e)))
        if found is None and rows:
            raise RunError(
                f"{self.out / 'checkpoints'}: no checkpoint restores, and starting over would drop the "
                f"{len(rows)} epochs recorded in metrics.jsonl: nothing was changed; start the run again "
                "in another --out"
            )
        epoch, state, record = found if found is not None else (0, None, None)
        history = record["history"] if record is not None else [r for r in rows if r["epoch"] <= epoch]
        if [r["epoch"] for r in history] != list(range(1, epoch + 1)):
            raise RunError(
                f"{self.out / 'metrics.jsonl'} records epochs {[r['epoch'] for r in history]} but the "
                f"checkpoints reach epoch {epoch}: resuming would lose that history; restore the file, "
                "or start the run again in another --out"
            )
        kept = rows[: len(history)]
        if record is not None and kept != history[: len(kept)]:
            differs = next(r["epoch"] for r, h in zip(kept, history) if r != h)
            raise RunError(
                f"{self.out / 'metrics.jsonl'}: epoch {differs} differs from what the checkpoint of epoch "
                f"{epoch} recorded: nothing was changed; restore the file, or start the run again in "
                "another --out"
            )
        moved = {}
        for bad, why in unusable:
            moved[bad] = self.last.move_aside(bad, why)
            self.log(f"warning: {why}; moved to {moved[bad]}; continuing from the checkpoint before it")
        self.start_epoch, self.state, self.history = epoch, state, list(history)
        if epoch:
            self._note_another_lowering(previous, identity, epoch)
        if rows != history:  # a commit whose metrics.jsonl was not rewritten yet, or epochs to run again
            write_metrics(self.out / "metrics.jsonl", history)
        self._align_events(moved)
        if previous.get("recipe") != identity["recipe"]:  # extended to more epochs (check_run_dir allowed it)
            write_atomically(
                self.out / "config.json",
                json.dumps({**previous, "recipe": identity["recipe"]}, indent=2) + "\n",
            )
        best = max(history, key=scored_accuracy, default=None)
        if (
            state is not None
            and best is not None
            and best["epoch"] == epoch
            and epoch not in self.best.epochs()
        ):
            self.best.save(epoch, state, self._record(epoch, state))  # stopped between the two saves

    def _align_events(self, moved: dict[int, Path]) -> None:
        """The TensorBoard event files mirror the history: the file of an epoch after it (to be
        trained again) moves next to its quarantined checkpoint (``moved``), or to
        ``quarantine/events-<time>/``; a committed epoch without a file gets it."""
        aside = None
        for epoch, path in events.event_files(self.out).items():
            if epoch > len(self.history):
                if epoch not in moved and aside is None:
                    aside = self.last.quarantine_folder("events")
                os.rename(path, moved.get(epoch, aside) / path.name)
        have = events.event_files(self.out)
        for row in self.history:
            if row["epoch"] not in have:
                events.write_epoch(self.out, row, self._hparams(row))

    def _hparams(self, row: dict) -> dict | None:
        return self.recipe_fields if row["epoch"] == 1 else None

    def _record(self, epoch: int, state) -> dict:
        return {
            "format": FORMAT,
            "epoch": epoch,
            "step": int(np.asarray(state.step)),
            "history": self.history,
            "versions": versions(),
        }

    def commit_epoch(self, row: dict, state) -> None:
        """Record an epoch: its checkpoint with its row (the commit), then the best checkpoint,
        then ``metrics.jsonl``. A crash at any point leaves a directory ``--resume`` continues."""
        best = scored_accuracy(row) > self.best_accuracy
        self.history.append(row)
        if not self.local:
            return
        record = self._record(row["epoch"], state)
        self.last.save(row["epoch"], state, record)
        if best:
            self.best.save(row["epoch"], state, record)
        write_metrics(self.out / "metrics.jsonl", self.history)
        events.write_epoch(self.out, row, self._hparams(row))


__all__ = [
    "RunError",
    "RunRecord",
    "Run",
    "RunDir",
    "load_run",
    "load_teacher",
    "read_run",
    "read_history",
    "check_run_dir",
    "run_identity",
    "scored_accuracy",
    "scored_split",
    "identity_differences",
    "locked",
    "read_metrics",
    "write_metrics",
    "versions",
    "device",
]
