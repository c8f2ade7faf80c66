"""Shared by the training tests: a small but real configuration, ways to compare runs, and
processes that never outlive their test."""

import os
import signal
import subprocess
import time

import jax
import numpy as np

from jax_mnist.recipes import get_recipe, with_overrides

# Model 8 with dropout, StepLR, rotation, 1,000 examples.
SUBSET = 1000
SMALL = {"epochs": 3, "batch_size": 128, "step_size": 2}
EPOCH_KEYS = ["epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds"]


def small_recipe(**extra):
    return with_overrides(get_recipe("final"), {**SMALL, **extra})


def snapshot(directory):
    """Every file under ``directory`` with its bytes: to show that nothing was changed."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's own reader finds in ``directory``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return {t: [(e.step, e.value) for e in accumulator.Scalars(t)] for t in accumulator.Tags()["scalars"]}


def numbers(history):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


def final_params(out):
    """The train state of ``out``'s last checkpoint, as numpy arrays."""
    from jax_mnist.rundir import load_run

    return jax.tree_util.tree_map(np.asarray, load_run(out).state)


# Every process a test starts through ``spawn``; conftest's autouse fixture reaps them after each
# test, passed, failed or timed out, so a hung child never outlives its test.
SPAWNED: list[subprocess.Popen] = []


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv, **kwargs)`` in a process group of its own, reaped after the test."""
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    SPAWNED.append(proc)
    return proc


def reap(processes: list[subprocess.Popen], grace: float = 5.0) -> list[int]:
    """Stop every process (and its group) still running: SIGTERM, then SIGKILL to those still
    there after ``grace`` seconds. Returns the pids that had to be stopped."""
    running = [p for p in processes if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in running:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:  # already gone
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 30)
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.05)
    for p in running:
        p.communicate()  # close its pipes
    return [p.pid for p in running]


def jax_mnist_command(args: str | list, **options) -> list[str]:
    """``python -m jax_mnist`` with ``args`` (a string is split on spaces) and then each option
    as ``--name value`` (``data_dir=`` gives ``--data-dir``): the argv of a subprocess test."""
    import sys

    words = args.split() if isinstance(args, str) else [str(a) for a in args]
    for name, value in options.items():
        words += [f"--{name.replace('_', '-')}", str(value)]
    return [sys.executable, "-m", "jax_mnist", *words]


def kill_then_resume(seed_args: list[str], out, data_dir, kill_at: str):
    """``jax-mnist train`` of the small configuration, SIGKILLed as soon as a line starting with
    ``kill_at`` is printed (that epoch's checkpoints are complete then), then run with --resume.
    Returns the resumed run's CompletedProcess."""
    import signal
    import subprocess

    small = f"--no-download --epochs 3 --batch-size 128 --set step_size=2 --train-examples {SUBSET}"
    cmd = jax_mnist_command(
        ["train", "--recipe", "final", *seed_args, *small.split()], out=out, data_dir=data_dir
    )
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(kill_at):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before printing {kill_at!r}"
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done
