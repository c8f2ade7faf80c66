"""What the libraries under jax-mnist print when it handles a fault itself.

Orbax, absl and tensorstore log a traceback for every failed read or write, and orbax's writer
threads and asyncio's "exception was never retrieved" keep logging after the save that failed
has returned. Where jax-mnist handles the fault (a corrupt checkpoint stepped over, a full disk)
it says so in one line; the libraries' pages are detail for a bug report, shown with
``jax-mnist --verbose``. A program that imports jax-mnist keeps its own logging settings: only
``quiet()`` blocks (the store's reads and writes) and ``hide_for_process()`` (what the CLI calls)
change them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import warnings

# The loggers that print the libraries' detail: orbax (through absl and its own), tensorstore's
# Python layer, asyncio's unretrieved task errors, concurrent.futures' worker errors, jax2onnx's
# plugins that do not load (a traceback each, on import) and onnx_ir's notes on its constants.
LIBRARY_LOGGERS = ("absl", "orbax", "tensorstore", "asyncio", "concurrent.futures", "jax2onnx", "onnx_ir")

_state = {"verbose": False, "hidden": False}


def set_verbose(verbose: bool) -> None:
    """``True``: show the libraries' detail and the chain of a handled error (``--verbose``);
    loggers an earlier ``hide_for_process`` silenced speak again."""
    _state["verbose"] = verbose
    if verbose and _state["hidden"]:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        _state["hidden"] = False


def verbose() -> bool:
    return _state["verbose"]


def hide_for_process() -> None:
    """Silence the library loggers for the rest of the process (the CLI without ``--verbose``):
    orbax's threads log after a failed save returns, so a block around the save is not enough."""
    if _state["verbose"]:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    if not _state["hidden"]:
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
        # orbax's reads abandoned on a failure leave coroutines that Python warns were never awaited
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    _state["hidden"] = True


def _unraisable_hook(default):
    """Python prints an exception it cannot raise (a callback run by garbage collection) as a
    traceback; orbax's event loops, closed after a failed read, leave such "Event loop is
    closed" errors. Those raised in the libraries' frames are dropped; any other goes to
    ``default``."""

    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        if not _state["verbose"] and frames and all(_library_frame(f.filename) for f in frames):
            return
        default(unraisable)

    return hook


def _library_frame(filename: str) -> bool:
    return any(part in filename for part in ("/asyncio/", "/orbax/", "/tensorstore/", "/concurrent/"))


@contextlib.contextmanager
def quiet():
    """The library loggers silenced while the block runs (left alone with ``--verbose``)."""
    if _state["verbose"] or _state["hidden"]:
        yield
        return
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def show_detail(error: BaseException, context: str) -> None:
    """With ``--verbose``, print the traceback behind a fault jax-mnist handles: the library's
    exception it was raised from (kept as its context though not shown by ``raise ... from None``),
    or the error itself; nothing otherwise."""
    if not _state["verbose"]:
        return
    behind = error.__cause__ or error.__context__ or error
    print(f"--- detail of {context} ---", file=sys.stderr)
    traceback.print_exception(behind, file=sys.stderr)
    print("--- end of detail ---", file=sys.stderr, flush=True)


__all__ = ["LIBRARY_LOGGERS", "hide_for_process", "quiet", "set_verbose", "show_detail", "verbose"]
