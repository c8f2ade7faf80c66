"""What the subcommands share: one-line errors, option types and groups, the data and processes."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from jax_mnist.errors import JaxMnistError

MAX_SEEDS = 10_000  # a bound on typos: --seeds 1-100000 would plan for minutes


class UserError(JaxMnistError):
    """Bad input from the user: printed as one line, no traceback."""


class Interrupted(JaxMnistError):
    """Ctrl-C or SIGTERM, with what to do next: exit status 130 or 143, as a shell's."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean stop follows."""


def continue_command(args, add_resume: bool) -> str:
    """The command line that continues what ``args`` started, as the user can type it."""
    argv = [a for a in args.argv if a != "--resume"]
    return "jax-mnist " + shlex.join(argv + (["--resume"] if add_resume else []))


def interrupted(args, error: KeyboardInterrupt, add_resume: bool) -> Interrupted:
    name, code = ("terminated (SIGTERM)", 143) if isinstance(error, Terminated) else ("interrupted", 130)
    return Interrupted(
        f"{name}; every finished epoch is checkpointed: continue with {continue_command(args, add_resume)}",
        code,
    )


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        help="tfds data dir (default $JAX_MNIST_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    g.add_argument(
        "--mnist-files",
        help="directory with the four official MNIST .gz files (default $JAX_MNIST_FILES, "
        "else <data-dir>/downloads/manual)",
    )
    g.add_argument("--no-download", action="store_true", help="never try tfds' network download")


def whole_number(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high]; a bad one is argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number, found {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, found {value}")
        return value

    return parse


def number(low: float, high: float, high_included: bool = True):
    """An argparse type: a finite number in [low, high] (or [low, high))."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number, found {text!r}") from None
        if not (math.isfinite(value) and low <= value and (value <= high if high_included else value < high)):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in [{low}, {high}{']' if high_included else ')'}, found {text}"
            )
        return value

    return parse


def parse_set(pairs: list[str]) -> dict[str, str]:
    """``--set FIELD=VALUE`` options as a dict (values are parsed by the recipe)."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise UserError(f"--set takes FIELD=VALUE, found {bad[0]!r}")
    return dict(kv.split("=", 1) for kv in pairs)


def parse_seeds(text: str) -> list[int]:
    """``1-5``, ``1,3,7`` or a mix (``1-3,7``) as a list of distinct seeds, in the order given."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            more = range(int(low), int(high) + 1) if high else [int(low)]
            if len(seeds) + len(more) > MAX_SEEDS:
                raise UserError(f"--seeds names more than {MAX_SEEDS:,} seeds: {text[:60]!r}")
            seeds += more
    except ValueError:
        raise UserError(f"--seeds takes seeds like 1-5 or 1,3,7, found {text!r}") from None
    if not seeds:
        raise UserError(f"--seeds names no seed: {text!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"--seeds names seed(s) {repeated} more than once: {text!r}")
    return seeds


def add_process_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several processes (hosts), on jax.distributed; default: $JAX_COORDINATOR_ADDRESS, "
        "$JAX_NUM_PROCESSES, $JAX_PROCESS_ID, else one process"
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    g.add_argument(
        "--num-processes", type=whole_number(1), metavar="N", help="how many processes the run has"
    )
    g.add_argument("--process-id", type=whole_number(0), metavar="I", help="this process's index, 0 .. N-1")


def join_processes(args) -> None:
    """Join a multi-process run if one is asked for (before anything touches a JAX device)."""
    from jax_mnist import hosts

    hosts.initialize(args.coordinator, args.num_processes, args.process_id)


def is_main_process() -> bool:
    from jax_mnist import hosts

    return not hosts.joined() or hosts.is_main()


def load_data(args):
    from jax_mnist.data import load_mnist

    return load_mnist(args.data_dir, args.mnist_files, download=not args.no_download)


def with_flags(overrides: dict, args, fields: tuple[str, ...]) -> dict:
    """``--set`` overrides with the recipe flags given (``--epochs`` ...) on top: a flag wins over
    ``--set`` of the same field, and when both are given a warning on stderr says which value."""
    merged = dict(overrides)
    for field in fields:
        value = getattr(args, field)
        if value is None:
            continue
        if field in overrides and _differs(field, overrides[field], value):
            flag = "--" + field.replace("_", "-")
            print(
                f"warning: {flag} {value} and --set {field}={overrides[field]} both set {field}; "
                f"the flag wins: {field}={value}",
                file=sys.stderr,
            )
        merged[field] = value
    return merged


def _differs(field: str, text: str, value) -> bool:
    from jax_mnist.recipes import parse_value

    try:
        return parse_value(field, text) != value
    except JaxMnistError:  # a bad --set value is reported by the recipe, with its field
        return True


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def checkpoint_choice(text: str) -> str | int:
    if text in ("best", "last"):
        return text
    try:
        epoch = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes best, last or an epoch number, found {text!r}") from None
    if epoch < 1:
        raise argparse.ArgumentTypeError(f"epochs count from 1, found {epoch}")
    return epoch


CHECKPOINT_HELP = (
    "which weights: best (the epoch of best test accuracy; of best validation accuracy in a run "
    "trained with --validation), last (default) or an epoch number"
)

VERBOSE_HELP = (
    "also print what the libraries (orbax, tensorstore, absl) report on a fault jax-mnist handles, "
    "and the traceback behind an error: detail for a bug report"
)
