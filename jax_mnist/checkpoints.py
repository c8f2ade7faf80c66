"""Checkpoints of a train state: orbax steps that carry their own record and digests.

A checkpoint of format 2 (``<kind>/<epoch>/``) has three items: ``weights`` (params,
batch_stats), ``rest`` (step, optimizer state) and ``record`` (JSON: the history of every epoch
up to it, the sha256 of the two array items, the versions that wrote it). Orbax writes a step to
a temporary directory and renames it when complete, so a step is there whole or not at all.
Format 1 (jax-mnist before it) has one ``default`` item and its digest in ``digests.json``.

``CheckpointStore`` reads (read-only orbax managers: nothing is created or cleaned up) and, for
``jax_mnist.rundir.RunDir`` alone, writes. A tree that does not fit what the code builds is a
``TreeMismatch``, found from the metadata before any byte is decoded; only bytes that fail their
digest or do not decode are a ``CorruptCheckpoint``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax

import jax_mnist
from jax_mnist import hosts, library_output
from jax_mnist.errors import CheckpointError
from jax_mnist.files import WriteError, write_atomically
from jax_mnist.schema import SchemaError, check_record

FORMAT = 2  # of the checkpoints written now; 1: one "default" item, digests in digests.json


class TreeMismatch(CheckpointError):
    """A checkpoint whose arrays do not fit the state the current code builds: not corruption."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose bytes fail their digest or do not decode."""


class UnverifiedCheckpoint(CheckpointError):
    """A checkpoint of format 1 with no digest recorded: its epoch never finished committing."""


class CheckpointVanished(CheckpointError):
    """A checkpoint removed while it was read (a training rotates its last two)."""


def versions() -> dict[str, str]:
    """What a run directory records of the software that wrote it."""
    return {
        "jax_mnist": jax_mnist.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
    }


# --------------------------------------------------------------------------- trees and digests


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(path) -> str:
    return "/".join(_key_name(k) for k in path)


def flat_arrays(tree) -> dict[str, Any]:
    """``'a/b/0/c' -> leaf``: the same keys for a typed tree (TrainState, optax's named tuples) and
    for what orbax restores of it without a target (dicts and lists)."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sha256(named_leaves) -> str:
    """sha256 over (name, array) pairs: each name, dtype and shape, then the bytes, in the order given."""
    digest = hashlib.sha256()
    for name, leaf in named_leaves:
        array = np.asarray(leaf)
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def tree_digest(tree) -> str:
    """sha256 over every array of ``tree`` (path, dtype, shape and bytes), in path order."""
    return _sha256(sorted(flat_arrays(tree).items()))


def state_digest(state) -> str:
    """The digest of checkpoint format 1 (``digests.json``): over the typed state in tree order."""
    return _sha256(
        (jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    )


def tree_differences(like, found) -> list[str]:
    """What differs between the arrays ``like`` expects and those ``found`` holds (shapes and dtypes
    of leaves with ``.shape``/``.dtype``), each as a short phrase."""
    want, have = flat_arrays(like), flat_arrays(found)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))

    def spec(x):
        return f"{np.dtype(x.dtype).name}{list(x.shape)}"

    reshaped = [k for k in sorted(set(want) & set(have)) if spec(want[k]) != spec(have[k])]
    phrases = []
    for label, keys in (("missing", missing), ("not expected", unexpected)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            phrases.append(f"{label}: {', '.join(keys[:3])}{more}")
    phrases += [f"{k}: {spec(have[k])} found, {spec(want[k])} expected" for k in reshaped[:3]]
    return phrases


def fit(like, found):
    """``found`` (a restored tree, any container types) in the structure of ``like``; its arrays
    must be exactly those ``like`` expects (else ``ValueError`` with the differences)."""
    differences = tree_differences(like, found)
    if differences:
        raise ValueError("; ".join(differences))
    arrays = flat_arrays(found)
    return jax.tree_util.tree_map_with_path(lambda p, _: arrays[_path_name(p)], like)


# --------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def _stderr_held():
    """Hold what is written to file descriptor 2 (by Python or by C++ threads) while the block runs;
    yields a list that receives it. A failed orbax save prints a traceback per pending write from
    tensorstore's threads; the caller reports the failure in one line instead, and replays the
    text when the block succeeded."""
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


def committed_epochs(directory: Path) -> list[int]:
    """The epochs whose checkpoint orbax finished (renamed into place) in ``directory``."""
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
    )


def _first_line(error: BaseException) -> str:
    """What a library's error says, short: the first line of the error it was raised from (the
    innermost names the array and the file), without tensorstore's appended dump."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    text = str(error).strip().splitlines()
    first = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}"


def _vanished(error: BaseException) -> bool:
    """Whether a failed read is a file removed under it (a training rotating its checkpoints)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FileNotFoundError) or "NOT_FOUND" in str(error) or "No such file" in str(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class CheckpointStore:
    """The checkpoints of one kind (``checkpoints`` or ``best``) of a run directory.

    ``writable=False`` (the default) opens orbax read-only: nothing is created or cleaned up."""

    def __init__(self, out: Path, kind: str = "checkpoints", writable: bool = False, keep: int = 2):
        self.out, self.kind, self.writable, self.keep = Path(out), kind, writable, keep
        self.directory = self.out / kind
        self._managers: dict[int, Any] = {}

    def manager(self, fmt: int = FORMAT):
        """Orbax's manager of this directory for checkpoints of format ``fmt`` (its items)."""
        import orbax.checkpoint as ocp

        if fmt not in self._managers:
            options: dict[str, Any] = {"enable_async_checkpointing": False}
            if self.writable:
                options.update(max_to_keep=self.keep, cleanup_tmp_directories=True)
                if hosts.count() > 1:
                    # Only the process that holds the run directory (the main one, jax_mnist.hosts)
                    # writes it, so orbax must not wait for the others at its barriers.
                    me = hosts.index()
                    options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                        primary_host=me, active_processes={me}
                    )
                    options["create"] = False  # orbax cannot create directories with active_processes set
                    self.directory.mkdir(parents=True, exist_ok=True)
            else:
                options.update(read_only=True, create=False)
            handlers = None
            if fmt == FORMAT:
                handlers = {
                    "weights": ocp.StandardCheckpointHandler(),
                    "rest": ocp.StandardCheckpointHandler(),
                    "record": ocp.JsonCheckpointHandler(),
                }
            with library_output.quiet():
                self._managers[fmt] = ocp.CheckpointManager(
                    self.directory.absolute(),
                    options=ocp.CheckpointManagerOptions(**options),
                    item_handlers=handlers,
                )
        return self._managers[fmt]

    def epochs(self) -> list[int]:
        return committed_epochs(self.directory)

    def format(self, epoch: int) -> int:
        return 1 if (self.directory / str(epoch) / "default").is_dir() else FORMAT

    def record(self, epoch: int) -> dict | None:
        """The JSON record of a format-2 checkpoint, checked (None for format 1, or when it is
        unreadable or malformed)."""
        if self.format(epoch) == 1:
            return None
        try:
            return self._record_of(self.directory / str(epoch), epoch)
        except CheckpointError:
            return None

    def _restore(self, epoch: int, items: dict[str, Any]) -> dict:
        """``items``: name -> target (a tree of arrays or ShapeDtypeStructs), or None for orbax's own
        structure; ``{"default": ...}`` is a format-1 checkpoint. Raises CorruptCheckpoint, or
        CheckpointVanished when a training removed it meanwhile."""
        import orbax.checkpoint as ocp

        def target(like):
            if like is None:
                return ocp.args.StandardRestore()
            # A multi-process run restores host arrays (a process-local jax.Array is not a valid
            # target there); the main process then broadcasts them (jax_mnist.run).
            make = jax.ShapeDtypeStruct if hosts.count() == 1 else np.zeros
            return ocp.args.StandardRestore(jax.tree_util.tree_map(lambda x: make(x.shape, x.dtype), like))

        where = self.directory / str(epoch)
        try:
            with library_output.quiet():
                if "default" in items:
                    return {"default": self.manager(1).restore(epoch, args=target(items["default"]))}
                args = ocp.args.Composite(**{name: target(like) for name, like in items.items()})
                return dict(self.manager().restore(epoch, args=args))
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many types)
            if not where.exists() or (_vanished(e) and not all((where / name).exists() for name in items)):
                raise CheckpointVanished(f"{where}: removed while it was read") from None
            raise CorruptCheckpoint(f"{where}: unreadable checkpoint ({_first_line(e)})") from None

    def _check_fits(self, epoch: int, likes: dict[str, Any], wrote: dict) -> None:
        """Compare the arrays a format-2 checkpoint holds (its metadata: nothing decoded) with
        what the current code expects; a difference is a TreeMismatch naming both versions."""
        where = self.directory / str(epoch)
        try:
            with library_output.quiet():
                metadata = self.manager().item_metadata(epoch)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"{where}: unreadable metadata ({_first_line(e)})") from None
        for name, like in likes.items():
            found = metadata[name] if metadata is not None and name in metadata else None
            tree = getattr(found, "tree", found)
            if tree is None:
                raise CorruptCheckpoint(f"{where}: no readable {name!r} item in the checkpoint")
            differences = tree_differences(like, tree)
            if differences:
                raise mismatch(where, name, differences, wrote)

    def restore_weights(
        self, epoch: int, like: dict, config: dict, state_like: Callable[[], Any]
    ) -> tuple[dict, int]:
        """``({'params', 'batch_stats'}, optimizer step)`` of ``epoch``, verified; read only.

        ``like``: the weights' tree; ``state_like()``: the whole train state's, which a checkpoint of
        format 1 needs (its digest covers the typed train state), asked for only then."""
        where = self.directory / str(epoch)
        if self.format(epoch) == 1:
            raw = self._restore(epoch, {"default": None})["default"]
            try:
                weights = fit(
                    like, {"params": raw.get("params", {}), "batch_stats": raw.get("batch_stats", {})}
                )
            except ValueError as e:
                raise mismatch(where, "weights", str(e).split("; "), config.get("versions", {})) from None
            # Its digest covers the whole typed train state: rebuild it to check the digest.
            self._verify_format_1(epoch, self._fit_format_1(where, state_like(), raw, config))
            return weights, int(np.asarray(raw.get("step", 0)))
        record = self._record_of(where, epoch)
        self._check_fits(epoch, {"weights": like}, record.get("versions", {}))
        weights = self._restore(epoch, {"weights": like})["weights"]
        self._verify(where, "weights", weights, record)
        return weights, int(record["step"])

    def restore_state(self, epoch: int, like, config: dict) -> tuple[Any, dict | None]:
        """(train state, record) of ``epoch`` in the structure of ``like`` (a TrainState), verified;
        the record is None for a format-1 checkpoint (its history is in metrics.jsonl)."""
        where = self.directory / str(epoch)
        if self.format(epoch) == 1:
            raw = self._restore(epoch, {"default": None})["default"]
            state = self._fit_format_1(where, like, raw, config)
            self._verify_format_1(epoch, state)
            return state, None
        record = self._record_of(where, epoch)
        parts = split_state(like)
        self._check_fits(epoch, parts, record.get("versions", {}))
        restored = self._restore(epoch, parts)
        for name in parts:
            self._verify(where, name, restored[name], record)
        return join_state(like, restored["weights"], restored["rest"]), record

    def _record_of(self, where: Path, epoch: int) -> dict:
        """The checked record of a format-2 checkpoint; CorruptCheckpoint when it does not decode
        or does not hold what jax-mnist writes there (naming the field)."""
        import orbax.checkpoint as ocp

        try:
            with library_output.quiet():
                restored = self.manager().restore(
                    epoch, args=ocp.args.Composite(record=ocp.args.JsonRestore())
                )
            record = restored["record"]
        except Exception:  # noqa: BLE001  (orbax raises many types)
            raise CorruptCheckpoint(f"{where}: its record (history and digests) does not decode") from None
        try:
            return check_record(f"{where}/record", record)
        except SchemaError as e:
            raise CorruptCheckpoint(str(e)) from None

    @staticmethod
    def _fit_format_1(where: Path, like, raw, config: dict):
        try:
            return fit(like, raw)
        except ValueError as e:
            raise mismatch(where, "train state", str(e).split("; "), config.get("versions", {})) from None

    @staticmethod
    def _verify(where: Path, name: str, tree, record: dict) -> None:
        expected = record.get("digests", {}).get(name)
        if expected is None:
            raise CorruptCheckpoint(f"{where}: its record holds no digest of {name!r}")
        if tree_digest(tree) != expected:
            raise CorruptCheckpoint(f"{where}: corrupt checkpoint ({name!r} does not match its digest)")

    def _verify_format_1(self, epoch: int, state) -> None:
        """Format 1 kept the digest of the typed train state in ``digests.json``."""
        where = self.directory / str(epoch)
        path = self.out / "digests.json"
        if not path.exists():  # written before jax-mnist kept digests: nothing to check against
            return
        try:
            digests = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UnverifiedCheckpoint(f"{where}: cannot be verified: {path} is unreadable ({e})") from None
        expected = digests.get(f"{self.kind}/{epoch}") if isinstance(digests, dict) else None
        if expected is None:
            raise UnverifiedCheckpoint(f"{where}: no digest recorded in {path} (its save never finished)")
        if state_digest(state) != expected:
            raise CorruptCheckpoint(
                f"{where}: corrupt checkpoint (its arrays do not match the digest in {path})"
            )

    # ------------------------------------------------------------------ writing (RunDir only)

    def save(self, epoch: int, state, record: dict) -> None:
        """Commit ``state`` as ``epoch`` with ``record`` (a checkpoint of the same epoch is replaced)."""
        import orbax.checkpoint as ocp

        parts = split_state(state)
        record = {**record, "digests": {name: tree_digest(tree) for name, tree in parts.items()}}
        target = self.directory / str(epoch)
        manager = self.manager()
        held: list[str] = []
        try:
            with library_output.quiet(), _stderr_held() as held:
                manager.reload()
                if epoch in manager.all_steps():  # the same epoch run again after a fall-back: replace it
                    manager.delete(epoch)
                args = ocp.args.Composite(
                    weights=ocp.args.StandardSave(parts["weights"]),
                    rest=ocp.args.StandardSave(parts["rest"]),
                    record=ocp.args.JsonSave(record),
                )
                manager.save(epoch, args=args, force=True)
                manager.wait_until_finished()
            if held[0]:
                print(held[0], end="", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001  (orbax wraps the OSError in its own types)
            if held and held[0] and library_output.verbose():  # what tensorstore's threads printed
                print(held[0], end="", file=sys.stderr, flush=True)
            _remove_unfinished(self.directory, epoch)
            os_error = _os_error_in(e)
            # tensorstore reports a full disk as ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")
            disk_full = (os_error is not None and os_error.errno == errno.ENOSPC) or any(
                marker in str(e) for marker in ("No space left on device", f"os_error_code='{errno.ENOSPC}'")
            )
            if disk_full:
                free = shutil.disk_usage(self.out).free
                raise WriteError(
                    f"{target}: disk full while writing the checkpoint of epoch {epoch} ({free:,} bytes "
                    "free); "
                    "the earlier checkpoints are intact: free some space and continue with --resume"
                ) from None
            if os_error is not None:
                raise WriteError(f"{target}: cannot write the checkpoint ({os_error.strerror})") from None
            raise

    def move_aside(self, epoch: int, why: str) -> Path:
        """Move a checkpoint a training cannot use to ``quarantine/`` (never deleted), with a copy of
        ``metrics.jsonl`` as it was and a note of why."""
        destination = self._quarantine_path(f"{self.kind}-{epoch}")
        destination.parent.mkdir(exist_ok=True)
        os.rename(self.directory / str(epoch), destination)
        if (self.out / "metrics.jsonl").exists():
            shutil.copy2(self.out / "metrics.jsonl", destination / "metrics.jsonl.at-quarantine")
        write_atomically(destination / "why.txt", why + "\n")
        with library_output.quiet():
            for manager in self._managers.values():
                manager.reload()
        return destination

    def _quarantine_path(self, name: str) -> Path:
        """A new path ``quarantine/<name>-<time>[-n]`` (not created)."""
        quarantine = self.out / "quarantine"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        destination, n = quarantine / f"{name}-{stamp}", 1
        while destination.exists():
            n += 1
            destination = quarantine / f"{name}-{stamp}-{n}"
        return destination

    def quarantine_folder(self, name: str) -> Path:
        """A new folder ``quarantine/<name>-<time>`` for other files a training moves aside."""
        destination = self._quarantine_path(name)
        destination.mkdir(parents=True)
        return destination

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()


def mismatch(where: Path, item: str, differences: list[str], wrote: dict) -> TreeMismatch:
    """The one-line error of a checkpoint that does not fit the current code."""
    now = versions()
    keys = ("jax_mnist", "jax", "flax", "optax")
    written = ", ".join(f"{k} {wrote.get(k, '?')}" for k in keys)
    reading = ", ".join(f"{k} {now[k]}" for k in keys)
    shown = "; ".join(differences[:4])
    return TreeMismatch(
        f"{where}: the checkpoint does not fit what this code builds ({item}: {shown}); written by "
        f"{written}, "
        f"read by {reading}. Nothing was changed: use the jax-mnist and library versions that wrote it, "
        "or the recipe in its config.json"
    )


def split_state(state) -> dict[str, Any]:
    """A train state as the items of a checkpoint: ``weights`` and ``rest``.

    ``weights`` are what the run is scored and used with: a state that keeps a moving average
    (recipe field ``ema``) stores the average there, and the weights it trains in ``rest``
    (``trained``), so every reader of a run's weights (evaluate, predict, export) gets the average."""
    trained = {"params": state.params, "batch_stats": state.batch_stats}
    if getattr(state, "ema", None) is None:
        return {"weights": trained, "rest": {"step": state.step, "opt_state": state.opt_state}}
    return {
        "weights": {"params": state.ema["params"], "batch_stats": state.ema["batch_stats"]},
        "rest": {"step": state.step, "opt_state": state.opt_state, "trained": trained},
    }


def join_state(like, weights: dict, rest: dict):
    """The train state of ``split_state``'s items, in the structure of ``like``."""
    if getattr(like, "ema", None) is None:
        trained, ema = weights, None
    else:
        trained, ema = rest["trained"], {"params": weights["params"], "batch_stats": weights["batch_stats"]}
    return like.replace(
        step=rest["step"],
        params=trained["params"],
        batch_stats=trained["batch_stats"],
        opt_state=rest["opt_state"],
        ema=ema,
    )


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (orbax re-raises it wrapped), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _remove_unfinished(directory: Path, epoch: int) -> None:
    """A failed save leaves orbax's temporary directory (never a committed step): remove it."""
    for path in directory.glob(f"{epoch}.*"):
        if "tmp" in path.name:
            shutil.rmtree(path, ignore_errors=True)
