"""Run directories never lose data: each bad case is refused in one line before anything is written,
and damaged checkpoints are detected and stepped over."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_mnist.rundir import Checkpoints, RunError, load_run, locked
from jax_mnist.run import train, train_seeds

from tests.helpers import SUBSET, final_params, numbers, small_recipe


def snapshot(directory):
    """Every file under ``directory`` with its bytes: to show that nothing was written."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(straight_run, tmp_path):
    """A private copy of the straight 3-epoch run."""
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    return out, straight_run[1]


def run(out, mnist, **extra):
    return train(small_recipe(**extra.pop("recipe", {})), mnist, out, seed=extra.pop("seed", 1), train_examples=SUBSET,
                 log=extra.pop("log", lambda s: None), **extra)  # fmt: skip


@pytest.mark.parametrize("leftover", [
    {"notes.txt": "mine"},
    {"metrics.jsonl": '{"loss": 1}\n'},  # someone else's metrics
    {"checkpoints/7/x": "", "checkpoints/8/x": ""},  # stale checkpoints of another run
])  # fmt: skip
def test_a_foreign_directory_is_refused_untouched(leftover, mnist, tmp_path):
    out = tmp_path / "foreign"
    for name, text in leftover.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    for resume in (False, True):
        with pytest.raises(RunError, match="not empty and not a jax-mnist run .no config.json.; refusing to write"):
            run(out, mnist, resume=resume)
    assert snapshot(out) == before


def test_a_different_run_names_the_fields_that_differ(finished, mnist):
    out, _ = finished
    before = snapshot(out)
    with pytest.raises(RunError, match=r"holds a different run \(recipe.lr: 0.1 there, 0.2 asked; seed: 1 there, 2 asked\)"):
        run(out, mnist, recipe={"lr": 0.2}, seed=2, resume=True)
    assert snapshot(out) == before


def test_a_finished_step_lr_run_extends_to_more_epochs(finished, mnist):
    out, history = finished
    extended = run(out, mnist, recipe={"epochs": 4}, resume=True)
    assert numbers(extended[:3]) == numbers(history) and [r["epoch"] for r in extended] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["recipe"]["epochs"] == 4


def test_a_onecycle_run_does_not_extend(tmp_path, mnist):
    out = tmp_path / "onecycle"
    recipe = {"schedule": "onecycle", "epochs": 1}
    run(out, mnist, recipe=recipe)
    with pytest.raises(RunError, match="a OneCycle schedule depends on the number of epochs"):
        run(out, mnist, recipe={**recipe, "epochs": 2}, resume=True)


def test_resume_needs_something_to_resume(mnist, tmp_path):
    with pytest.raises(RunError, match="no such run directory, so nothing to resume"):
        run(tmp_path / "missing", mnist, resume=True)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="empty, so nothing to resume"):
        run(tmp_path / "empty", mnist, resume=True)


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_a_corrected_one(mnist, tmp_path):
    out = tmp_path / "early"
    with pytest.raises(RunError, match="batch size 5000 is larger"):
        run(out, mnist, recipe={"batch_size": 5000})
    assert not out.exists()  # checked before anything was written
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"recipe": {"name": "final", "lr": 9.0}, "seed": 1}))  # killed early
    assert [r["epoch"] for r in run(out, mnist, recipe={"epochs": 1})] == [1]


def test_a_second_process_is_refused_and_a_stale_lock_taken_over(mnist, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(RunError, match=f"in use by process {sleeper.pid}"):
            with locked(out):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with locked(out):  # its process is gone: the lock is stale
        assert (out / ".lock").read_text() == str(os.getpid())
    assert not (out / ".lock").exists()


def test_history_shorter_than_the_checkpoints_is_refused(finished, mnist):
    out, _ = finished
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n")
    before = snapshot(out)
    with pytest.raises(RunError, match=r"records epochs \[1\] but the checkpoints reach epoch 3"):
        run(out, mnist, resume=True)
    assert snapshot(out) == before


def flip_a_byte(checkpoint_dir):
    data = max((p for p in checkpoint_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(finished, mnist):
    out, history = finished
    flip_a_byte(out / "checkpoints" / "3")
    logged = []
    resumed = run(out, mnist, resume=True, log=logged.append)
    warnings = [line for line in logged if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoints/3" in warnings[0] and "falling back" in warnings[0]
    assert "\n" not in warnings[0]
    assert numbers(resumed) == numbers(history)  # epoch 3 re-run from epoch 2: the same numbers
    with pytest.raises(RunError, match="corrupt checkpoint|unreadable checkpoint"):
        flip_a_byte(out / "checkpoints" / "3")
        Checkpoints(out).restore(3, load_run(out, 2).state)


def test_no_good_checkpoint_with_history_is_refused(finished, mnist):
    out, _ = finished
    for epoch in ("2", "3"):
        flip_a_byte(out / "checkpoints" / epoch)
    with pytest.raises(RunError, match="no checkpoint restores, and starting over would drop the 3 epochs"):
        run(out, mnist, resume=True)


# How a full disk reaches us: an OSError, or (measured, orbax 0.12 with tensorstore) a ValueError.
FULL_DISK = [OSError(errno.ENOSPC, "No space left on device"),
             ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": Failed to write 6223 bytes to "
                        "file 11: No space left on device [os_error_code='28']")]  # fmt: skip


@pytest.mark.parametrize("error", FULL_DISK, ids=["OSError", "tensorstore"])
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(error, mnist, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    out = tmp_path / "full"
    save = ocp.CheckpointManager.save
    calls = {"n": 0}

    def save_until_the_disk_fills(self, step, *args, **kwargs):
        calls["n"] += 1
        if step == 2:
            (self.directory / "2.orbax-checkpoint-tmp-1").mkdir()  # what a save leaves behind when it fails
            raise error
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_fills)
    with pytest.raises(RunError, match=r"checkpoints/2: disk full while writing the checkpoint of epoch 2 \([\d,]+ bytes free\)"):
        run(out, mnist)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert load_run(out).epoch == 1  # the previous checkpoint is intact and verifies


def test_best_checkpoint_and_load_run(straight_run):
    out, history = straight_run
    best_epoch = 1 + int(np.argmax([r["test_accuracy"] for r in history]))
    last = load_run(out)
    assert (last.seed, last.train_examples, last.epoch, last.recipe) == (1, SUBSET, 3, small_recipe())
    assert last.history == history
    best = load_run(out, "best")
    assert best.epoch == best_epoch and sorted(p.name for p in (out / "best").iterdir()) == [str(best_epoch)]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, last.state), final_params(out))
    with pytest.raises(RunError, match=r"no checkpoint of epoch 1; found \[2, 3\]"):
        load_run(out, 1)


def test_multi_seed_resume_starts_seeds_that_have_not_started(mnist, tmp_path):
    with pytest.raises(RunError, match="none of the run directories exists yet"):
        train_seeds(small_recipe(), mnist, {1: tmp_path / "a", 2: tmp_path / "b"}, train_examples=SUBSET, resume=True)


def test_a_recipe_field_added_later_counts_as_its_default():
    """A run made before a recipe field existed (its config lacks it) is that field's default:
    it still resumes, and asking for another value is a different run."""
    import dataclasses

    from jax_mnist.rundir import identity_differences, run_identity

    asked = run_identity(small_recipe(), 1, SUBSET)
    older = json.loads(json.dumps(asked))
    del older["recipe"]["label_smoothing"]
    assert identity_differences(older, asked) == {}
    smoothed = run_identity(dataclasses.replace(small_recipe(), label_smoothing=0.1), 1, SUBSET)
    assert identity_differences(older, smoothed) == {"recipe.label_smoothing": (0.0, 0.1)}
