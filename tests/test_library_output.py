"""Where jax-mnist handles a fault, the libraries under it print nothing unless --verbose asks for
their detail (issue 29): loggers silenced for the CLI's process, unraisable errors of their event
loops dropped, the traceback behind a handled error shown on request."""

import logging
import sys
import types

import pytest

from jax_mnist import library_output
from jax_mnist.errors import JaxMnistError


@pytest.fixture
def cli_process():
    """The state the CLI leaves (hide_for_process), over an unraisable hook that records what
    reaches it; yields that record, and puts everything back afterwards."""
    levels = {name: logging.getLogger(name).level for name in library_output.LIBRARY_LOGGERS}
    hook = sys.unraisablehook
    reached = []
    library_output.set_verbose(True)  # whatever an earlier CLI call left, loggers speak again
    library_output.set_verbose(False)
    sys.unraisablehook = reached.append
    library_output.hide_for_process()
    yield reached
    library_output.set_verbose(False)
    sys.unraisablehook = hook
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_library_loggers_are_silent_in_the_cli_and_speak_with_verbose(cli_process):
    for name in (*library_output.LIBRARY_LOGGERS, "orbax.checkpoint._src.futures"):
        assert not logging.getLogger(name).isEnabledFor(logging.CRITICAL)
    assert logging.getLogger("jax_mnist").isEnabledFor(logging.WARNING)  # ours are not touched
    library_output.set_verbose(True)
    assert logging.getLogger("absl").isEnabledFor(logging.ERROR)


def unraisable_from(filename: str):
    """An unraisable-hook argument whose traceback runs through a file of that name."""
    code = compile("def fail():\n    raise RuntimeError('Event loop is closed')\n", filename, "exec")
    namespace: dict = {}
    exec(code, namespace)
    try:
        namespace["fail"]()
    except RuntimeError as e:
        error = e
    return types.SimpleNamespace(
        exc_type=RuntimeError,
        exc_value=error,
        exc_traceback=error.__traceback__.tb_next,
        err_msg=None,
        object=None,
    )


def test_unraisable_errors_of_the_libraries_event_loops_are_dropped_others_kept(cli_process):
    sys.unraisablehook(unraisable_from("/venv/lib/python3.11/asyncio/base_events.py"))
    assert cli_process == []
    ours = unraisable_from("/work/jax_mnist/run.py")
    sys.unraisablehook(ours)
    assert cli_process == [ours]
    library_output.set_verbose(True)
    sys.unraisablehook(unraisable_from("/venv/lib/python3.11/asyncio/base_events.py"))
    assert len(cli_process) == 2


def test_the_detail_behind_a_handled_error_only_with_verbose(capsys):
    try:
        try:
            raise ValueError("DATA_LOSS: tensorstore's page")
        except ValueError:
            raise JaxMnistError("one line") from None
    except JaxMnistError as e:
        handled = e
    library_output.show_detail(handled, "the checkpoint of epoch 3")
    assert capsys.readouterr().err == ""
    library_output.set_verbose(True)
    try:
        library_output.show_detail(handled, "the checkpoint of epoch 3")
    finally:
        library_output.set_verbose(False)
    err = capsys.readouterr().err
    assert "detail of the checkpoint of epoch 3" in err and "DATA_LOSS: tensorstore's page" in err
    assert "Traceback" in err
