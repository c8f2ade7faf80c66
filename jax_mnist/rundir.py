"""A run directory that never loses data: identity checks, a lock, verified checkpoints, the best one.

Layout (one seed):
- ``config.json``: the run's identity (resolved recipe, seed, training-set size) plus versions
  and device;
- ``metrics.jsonl``: one JSON object per finished epoch;
- ``checkpoints/<epoch>/``: orbax checkpoints of the last two epochs;
- ``best/<epoch>/``: the checkpoint of the epoch with the best test accuracy so far;
- ``digests.json``: sha256 of every checkpoint's arrays, written after its save completed
  and checked on every restore;
- ``.lock``: the pid of the process training in the directory, while it runs.

Every check here happens before anything is written; a failure is a ``RunError`` whose one
line names the path and what was expected and found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jax_mnist.errors import JaxMnistError
from jax_mnist.recipes import Recipe


class RunError(JaxMnistError, ValueError):
    """A run that cannot start or go on (bad arguments, a foreign --out, non-finite loss)."""


# Fields whose change leaves the numbers of the epochs already run as they were, when the
# schedule does not depend on the number of epochs (OneCycle does): a finished run can be extended.
_EXTENDABLE = {"recipe.epochs"}


def run_identity(recipe: Recipe, seed: int, train_examples: int) -> dict:
    """What must match for a run directory to be resumed (everything that changes the numbers)."""
    return {"recipe": dataclasses.asdict(recipe), "seed": seed, "train_examples": train_examples}


_RECIPE_DEFAULTS = {f"recipe.{f.name}": f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}


def _flat(identity: dict) -> dict[str, Any]:
    flat = {f"recipe.{k}": v for k, v in identity.get("recipe", {}).items()} if isinstance(identity.get("recipe"), dict) else {}
    flat.update({k: v for k, v in identity.items() if k != "recipe"})
    return flat


def identity_differences(found: dict, asked: dict) -> dict[str, tuple[Any, Any]]:
    """field -> (value in the directory, value asked for), for every field that differs. A recipe
    field added after the run was made counts as its default (which is what that run used)."""
    old, new = _flat(found), _flat(asked)
    if isinstance(found.get("recipe"), dict):
        old = {**_RECIPE_DEFAULTS, **old}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line that is not one of our epoch rows is an error naming it."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise RunError(f"{path}, line {number}: not JSON: {line[:60]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise RunError(f"{path}, line {number}: expected an epoch row with an integer 'epoch', found {line[:60]!r}")
        rows.append(row)
    return rows


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"{path}: cannot write ({e.strerror})") from None


def write_metrics(path: Path, rows: list[dict]) -> None:
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))


def _has_checkpoints(out: Path) -> bool:
    return any(p.name.isdigit() for p in (out / "checkpoints").glob("*"))


def check_run_dir(out: Path, identity: dict, resume: bool, schedule: str) -> dict | None:
    """Whether ``out`` may receive (or continue) the run of ``identity``; nothing is written.

    Returns the directory's config when it continues a run, None when the run starts afresh.
    """
    if not out.exists():
        if resume:
            raise RunError(f"{out}: no such run directory, so nothing to resume (drop --resume to start the run)")
        return None
    if not out.is_dir():
        raise RunError(f"{out}: not a directory")
    config_path = out / "config.json"
    if not config_path.exists():
        if any(out.iterdir()):
            raise RunError(f"{out}: not empty and not a jax-mnist run (no config.json); refusing to write "
                           "into it: choose another --out")  # fmt: skip
        if resume:
            raise RunError(f"{out}: empty, so nothing to resume (drop --resume to start the run)")
        return None
    previous = read_json(config_path)
    started = _has_checkpoints(out) or bool(read_metrics(out / "metrics.jsonl"))
    differences = identity_differences({k: previous.get(k) for k in identity}, identity)
    if not started:  # a run that stopped before its first checkpoint: nothing to lose
        return None
    extending = set(differences) <= _EXTENDABLE and schedule != "onecycle"
    if differences and not (extending and differences["recipe.epochs"][1] >= differences["recipe.epochs"][0]):
        listed = "; ".join(f"{k}: {old!r} there, {new!r} asked" for k, (old, new) in differences.items())
        why = (" (a OneCycle schedule depends on the number of epochs, so more epochs is another run)"
               if set(differences) <= _EXTENDABLE else "")  # fmt: skip
        raise RunError(f"{out} holds a different run ({listed}){why}; refusing to overwrite it: choose another --out")
    if not resume:
        raise RunError(f"{out} already holds this run; pass --resume to continue it, or choose another --out")
    return previous


# --------------------------------------------------------------------------- lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(out: Path):
    """Hold ``out/.lock`` (our pid) while the block runs; another live holder is refused.

    A lock left by a process that no longer exists (kill -9) is taken over.
    """
    lock = out / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                raise RunError(f"{out} is in use by process {holder} (lock {lock}); wait for it or stop it") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# --------------------------------------------------------------------------- checkpoints


def state_digest(state) -> str:
    """sha256 over every array of ``state`` (paths, dtypes, shapes and bytes, in tree order)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs a traceback for every failed restore; ours says it in one line instead."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "orbax.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _stderr_held():
    """Hold what is written to file descriptor 2 (by Python or by C++ threads) while the block runs;
    yields a list that receives it. A failed orbax save prints a traceback per pending write from
    tensorstore's threads; the caller reports the failure in one line instead, and replays the
    text when the block succeeded."""
    import tempfile

    sys.stderr.flush()
    held: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.append(sink.read().decode(errors="replace"))


class Checkpoints:
    """The checkpoints of one run directory: the last two epochs, the best one, their digests."""

    def __init__(self, out: Path, warn=None):
        import orbax.checkpoint as ocp

        self.out = Path(out)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        common: dict[str, Any] = {"enable_async_checkpointing": False}
        if jax.process_count() > 1:
            # A multi-process run: only the process that holds the run directory (the main one,
            # jax_mnist.hosts) writes it, so orbax must not wait for the others at its barriers.
            me = jax.process_index()
            common["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
            common["create"] = False  # orbax cannot create the directories with active_processes set
            for kind in ("checkpoints", "best"):
                (self.out / kind).mkdir(parents=True, exist_ok=True)
        with _quiet_orbax():
            self.last = ocp.CheckpointManager((self.out / "checkpoints").absolute(),
                                              options=ocp.CheckpointManagerOptions(max_to_keep=2, **common))
            self.best = ocp.CheckpointManager((self.out / "best").absolute(),
                                              options=ocp.CheckpointManagerOptions(max_to_keep=1, **common))

    @property
    def digests_path(self) -> Path:
        return self.out / "digests.json"

    def _digests(self) -> dict[str, str]:
        return read_json(self.digests_path) if self.digests_path.exists() else {}

    def epochs(self) -> list[int]:
        return sorted(self.last.all_steps())

    def best_epoch(self) -> int | None:
        return self.best.latest_step()

    def save(self, epoch: int, state, best: bool = False) -> None:
        """Save ``state`` as epoch ``epoch`` (and as the best one), then record its digest."""
        for kind, manager in (("checkpoints", self.last), *((("best", self.best),) if best else ())):
            self._save(manager, kind, epoch, state)

    def _save(self, manager, kind: str, epoch: int, state) -> None:
        import orbax.checkpoint as ocp

        target = self.out / kind / str(epoch)
        try:
            with _quiet_orbax(), _stderr_held() as held:
                if epoch in manager.all_steps():  # the same epoch run again after a fall-back: replace it
                    manager.delete(epoch)
                manager.save(epoch, args=ocp.args.StandardSave(state), force=True)
                manager.wait_until_finished()
            if held[0]:
                print(held[0], end="", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001  (orbax wraps the OSError in its own types)
            _remove_partial(self.out / kind, epoch)
            os_error = _os_error_in(e)
            # tensorstore reports a full disk as ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")
            disk_full = (os_error is not None and os_error.errno == errno.ENOSPC) or any(
                marker in str(e) for marker in ("No space left on device", f"os_error_code='{errno.ENOSPC}'"))  # fmt: skip
            if disk_full:
                free = shutil.disk_usage(self.out).free
                raise RunError(f"{target}: disk full while writing the checkpoint of epoch {epoch} "
                               f"({free:,} bytes free); the earlier checkpoints are intact: free some space "
                               f"and continue with --resume") from None  # fmt: skip
            if os_error is not None:
                raise RunError(f"{target}: cannot write the checkpoint ({os_error.strerror})") from None
            raise
        digests = self._digests()
        digests[f"{kind}/{epoch}"] = state_digest(state)
        write_atomically(self.digests_path, json.dumps(digests, indent=1, sort_keys=True) + "\n")

    def restore(self, epoch: int, like, kind: str = "checkpoints"):
        """The state saved as ``kind/epoch``, verified against its digest (RunError if it fails).

        ``like``: a tree of arrays or ``ShapeDtypeStruct``s of the state's structure."""
        import orbax.checkpoint as ocp

        manager = self.last if kind == "checkpoints" else self.best
        # A multi-process run restores host arrays (a process-local jax.Array is not a valid
        # target there); the main process then broadcasts them (jax_mnist.run).
        target = jax.ShapeDtypeStruct if jax.process_count() == 1 else np.zeros
        abstract = jax.tree_util.tree_map(lambda x: target(x.shape, x.dtype), like)
        where = self.out / kind / str(epoch)
        try:
            with _quiet_orbax():
                state = manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many types)
            raise RunError(f"{where}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        if not self.digests_path.exists():  # written before jax-mnist kept digests
            self.warn(f"{where}: not verified (no {self.digests_path.name}: written by an older jax-mnist)")
            return state
        expected = self._digests().get(f"{kind}/{epoch}")
        if expected is None:
            raise RunError(f"{where}: no digest recorded in {self.digests_path}, so the checkpoint cannot be verified")
        if state_digest(state) != expected:
            raise RunError(f"{where}: corrupt checkpoint (its arrays do not match the digest in {self.digests_path})")
        return state

    def restore_latest_good(self, like, up_to: int | None = None) -> tuple[int, Any] | None:
        """(epoch, state) of the newest checkpoint that restores and verifies; a bad one is
        reported in one line, deleted, and the one before it is tried."""
        for epoch in reversed([e for e in self.epochs() if up_to is None or e <= up_to]):
            try:
                return epoch, self.restore(epoch, like)
            except RunError as e:
                self.warn(f"{e}; falling back to the checkpoint before it")
                with _quiet_orbax():
                    self.last.delete(epoch)
        return None

    def close(self) -> None:
        self.last.close()
        self.best.close()


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (orbax re-raises it wrapped), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _remove_partial(directory: Path, epoch: int) -> None:
    """A failed save leaves orbax's temporary directory (or a half-written step): remove it."""
    for path in directory.glob(f"{epoch}*"):
        if path.name != str(epoch) or not (path / "_CHECKPOINT_METADATA").exists():
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- reading a run


@dataclasses.dataclass(frozen=True)
class Run:
    """A run directory as data: what ``load_run`` returns."""

    out: Path
    recipe: Recipe
    seed: int
    train_examples: int
    config: dict
    history: list[dict]
    epoch: int  # the epoch whose state this is
    state: Any  # engine.TrainState


def load_run(out_dir: str | os.PathLike, checkpoint: str | int = "last") -> Run:
    """A finished or interrupted run: its recipe, seed, metrics, and the verified train state of
    ``checkpoint``: "last" (the newest good checkpoint), "best" (best test accuracy) or an epoch."""
    from jax_mnist.engine import Engine

    out = Path(out_dir)
    config_path = out / "config.json"
    if not config_path.exists():
        raise RunError(f"{out}: not a jax-mnist run directory (no config.json)")
    config = read_json(config_path)
    try:
        recipe = Recipe(**config["recipe"])
        seed, train_examples = int(config["seed"]), int(config["train_examples"])
    except (KeyError, TypeError) as e:
        raise RunError(f"{config_path}: not a run config of this version of jax-mnist ({e})") from None
    like = jax.eval_shape(Engine.from_recipe(recipe, train_examples).init, jax.random.key(0))
    checkpoints = Checkpoints(out)
    try:
        if checkpoint == "best":
            epoch = checkpoints.best_epoch()
            if epoch is None:
                raise RunError(f"{out / 'best'}: no best checkpoint")
            state = checkpoints.restore(epoch, like, kind="best")
        elif checkpoint == "last":
            found = checkpoints.restore_latest_good(like)
            if found is None:
                raise RunError(f"{out / 'checkpoints'}: no checkpoint that restores")
            epoch, state = found
        else:
            epoch = int(checkpoint)
            if epoch not in checkpoints.epochs():
                raise RunError(f"{out / 'checkpoints'}: no checkpoint of epoch {epoch}; found {checkpoints.epochs()}")
            state = checkpoints.restore(epoch, like)
    finally:
        checkpoints.close()
    return Run(out, recipe, seed, train_examples, config, read_metrics(out / "metrics.jsonl"), epoch, state)
