"""Files written whole or not at all, and outputs that never land on a run's own files.

``write_atomically`` is the one way this package writes a file: the bytes go to a temporary file
beside the target, which is renamed onto it; any failure (a full disk, Ctrl-C) removes the
temporary file and is reported as a ``WriteError`` that names the target. ``output_path`` checks,
before any work, that a command's output is not one of a run directory's own files and does not
replace an existing file unless asked to.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from jax_mnist.errors import JaxMnistError

Content = str | bytes | Callable[[IO[bytes]], None]

# What a run directory holds (jax_mnist.rundir): no command's output may replace these.
RUN_FILES = ("config.json", "metrics.jsonl", "digests.json", ".lock")
RUN_FOLDERS = ("checkpoints", "best", "quarantine")
RUN_FILE_PREFIXES = ("events.out.tfevents.",)  # TensorBoard's event files (jax_mnist.events)


class WriteError(JaxMnistError):
    """A file that could not be written; the message names the file and why."""


def write_atomically(path: str | os.PathLike, content: Content) -> Path:
    """Write ``content`` (text, bytes, or a function that writes to a binary file) to ``path``.

    Readers see the old file or the whole new one, never a part; on failure nothing is left.
    The file gets the permissions ``open`` would give it (0666 less the umask). The directory must
    exist (a missing one is reported like any other failure)."""
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror})") from None
    tmp = Path(tmp_name)
    try:
        os.chmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; `open` would honour the umask
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it back at once
    os.umask(mask)
    return mask


def run_directory_of(path: Path) -> Path | None:
    """The run directory that ``path`` would land in as one of its own files, if any."""
    path = Path(os.path.abspath(path))
    for parent in [path.parent, *path.parents]:
        if (parent / "config.json").is_file():
            inside = path.relative_to(parent).parts
            own_file = len(inside) == 1 and (
                inside[0] in RUN_FILES or inside[0].startswith(RUN_FILE_PREFIXES)
            )
            if inside and (inside[0] in RUN_FOLDERS or own_file):
                return parent
            return None
    return None


def output_paths(paths, force: bool, what: str = "output") -> list[Path]:
    """The output files of one command, each checked as ``output_path`` does, and never two of them
    at one path (one would replace the other)."""
    checked = [output_path(p, force, what) for p in paths]
    seen: dict[Path, Path] = {}
    for path in checked:
        key = Path(os.path.abspath(path))
        if key in seen:
            raise WriteError(f"{path}: two outputs of the {what} would be written there; name another path")
        seen[key] = path
    return checked


def output_path(path: str | os.PathLike, force: bool, what: str = "output") -> Path:
    """``path`` as a command's output file, checked before the work is done: never a file of a run
    directory (its config, metrics, lock or checkpoints), and an existing file only with ``force``."""
    path = Path(path)
    run = run_directory_of(path)
    if run is not None:
        raise WriteError(
            f"{path}: is a file of the run directory {run}; refusing to write the {what} there: "
            "choose another path"
        )
    if path.is_dir():
        raise WriteError(f"{path}: is a directory; name a file for the {what}")
    if path.exists() and not force:
        raise WriteError(f"{path}: exists; pass --force to replace it, or choose another path")
    return path
