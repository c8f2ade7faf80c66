"""`jax-mnist` command line: one subcommand per task, one-line errors for bad input.

Each subcommand's options, help and handler are in one module of this package (``info``:
recipes, summary, data, show-augment; ``train``; ``search``; ``bench``; ``study``; ``report``;
``runs``: evaluate, predict, export); ``options`` holds what they share. A handler imports the
rest of the package when it runs, so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

import jax_mnist
from jax_mnist import host_memory, hosts, library_output
from jax_mnist.cli import bench, info, report, runs, search, study, train
from jax_mnist.cli.options import (  # noqa: F401  (public: tests and callers use them from here)
    VERBOSE_HELP,
    Interrupted,
    Terminated,
    UserError,
    parse_seeds,
    with_flags,
)
from jax_mnist.errors import JaxMnistError

# In the order `jax-mnist --help` lists them.
COMMANDS = (info, train, search, bench, study, report, runs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-mnist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"jax-mnist {jax_mnist.__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(sub)
    for subparser in sub.choices.values():  # also after the subcommand: jax-mnist evaluate RUN --verbose
        subparser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Process-wide, so here and not on import: before JAX starts its CPU backend (see host_memory).
    host_memory.apply_from_env()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)  # --help writes too
    except BrokenPipeError:
        return _closed_pipe()
    args.argv = argv
    library_output.set_verbose(args.verbose)
    library_output.hide_for_process()
    with _sigterm_as_interrupt():
        code = _run(args)
    if code:
        _leave_processes(code)
    return code


def _closed_pipe() -> int:
    """The reader of stdout went away (`| head`): stop quietly with the shell's status of a SIGPIPE,
    stdout pointed at /dev/null so that the flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops a command as Ctrl-C does (one line, how to continue, exit 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def backend_problem() -> str | None:
    """What stops JAX from starting the backend ``$JAX_PLATFORMS`` names, with the platforms it
    can start instead; None when JAX starts (JAX itself raises a bare AssertionError there)."""
    import jax

    asked = os.environ.get("JAX_PLATFORMS")
    if not asked:
        return None
    try:
        jax.devices()
        return None
    except Exception:  # noqa: BLE001  (JAX raises AssertionError or RuntimeError here)
        pass
    import jax.extend.backend

    jax.config.update("jax_platforms", None)  # what JAX finds when not told
    jax.extend.backend.clear_backends()
    try:
        found = ", ".join(sorted({d.platform for d in jax.devices()}))
    except Exception:  # noqa: BLE001
        found = "none"
    return (
        f"JAX_PLATFORMS={asked}: JAX cannot start that platform here; it finds: {found} "
        "(unset JAX_PLATFORMS, or install the jax plugin for it, e.g. jax[cuda12])"
    )


def _run(args) -> int:
    try:
        args.func(args)
    except Interrupted as e:
        print(f"jax-mnist {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except JaxMnistError as e:
        library_output.show_detail(e, "the error below")
        print(f"jax-mnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (AssertionError, RuntimeError):
        problem = backend_problem()
        if problem is None:
            raise
        print(f"jax-mnist {args.command}: error: {problem}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(
            f"jax-mnist {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}",
            file=sys.stderr,
        )
        return 143 if terminated else 130
    return 0


def _leave_processes(code: int) -> None:
    """A process of a multi-process run that stops on an error exits now: at a normal exit JAX
    would wait at its shutdown barrier for the other processes, then abort with a stack trace."""
    if hosts.joined():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
