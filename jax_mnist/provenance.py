"""Which code made a run: the git commit of the checkout the package runs from, and whether the
package's files differed from it (``dirty``), recorded in each run's ``config.json``.

The commit is read only when the package runs from a git checkout's own ``jax_mnist/`` (an
editable install); an installed wheel has no commit and records ``None``. ``dirty`` looks at the
files that make the numbers (the package and ``pyproject.toml``), tracked or new; results and
docs beside them do not count.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from jax_mnist.recipes import RECIPE_SCHEMA_VERSION

_PACKAGE = Path(__file__).resolve().parent


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine, or a hung one
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_provenance(package_dir: Path = _PACKAGE) -> dict:
    """``{"commit": sha | None, "dirty": bool | None, "recipe_schema": int}``."""
    root = package_dir.parent
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD") if top and Path(top).resolve() == root.resolve() else None
    dirty = None
    if commit is not None:
        code = (package_dir.name, "pyproject.toml")
        changes = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *code)
        dirty = None if changes is None else bool(changes)
    return {"commit": commit, "dirty": dirty, "recipe_schema": RECIPE_SCHEMA_VERSION}


__all__ = ["code_provenance"]
