"""Run directories never lose data: each bad case is refused in one line before anything is written,
reading a run changes nothing in it, damaged checkpoints are moved aside (never deleted), and an
epoch is committed once, whatever point a crash hits."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jax_mnist
from jax_mnist import checkpoints, onednn, rundir
from jax_mnist.checkpoints import TreeMismatch
from jax_mnist.cli import main
from jax_mnist.files import WriteError, write_atomically
from jax_mnist.run import train, train_seeds
from jax_mnist.rundir import RunError, load_run, locked
from tests.helpers import SUBSET, final_params, numbers, small_recipe, snapshot, spawn, tensorboard_scalars

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"  # epochs 1-2 of small_recipe(), seed 1, old format


@pytest.fixture
def finished(straight_run, tmp_path):
    """A private copy of the straight 3-epoch run."""
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    return out, straight_run[1]


@pytest.fixture
def old_run(tmp_path):
    """A private copy of a run written by jax-mnist before checkpoint format 2 (digests.json)."""
    out = tmp_path / "old"
    shutil.copytree(FIXTURE, out)
    return out


def assert_continues_the_fixture(resumed: list[dict], old_run, straight_run, kept_epochs: int) -> None:
    """``resumed`` (the fixture run continued here) keeps the fixture's first ``kept_epochs`` rows
    as written and computes the same function as this machine's straight run.

    The fixture's epochs were computed on the CPU that wrote it. XLA:CPU's float sums differ in the
    last bits between CPU models (AVX2 / AVX-512), so the straight run of this machine is the same
    function, not the same bits (bitwise resume is tested on one machine: the kill points, SIGKILL).
    """
    written = [json.loads(line) for line in (FIXTURE / "metrics.jsonl").read_text().splitlines()]
    assert resumed[:kept_epochs] == written[:kept_epochs]
    # Losses: 2.0-2.1 % apart at epoch 3 when the fixture's im2col epochs continue with oneDNN's
    # kernels (measured); a run restarted instead of resumed is off by far more.
    for got, want in zip(resumed, straight_run[1], strict=True):
        assert (got["epoch"], got["lr"]) == (want["epoch"], want["lr"])
        for key in ("train_loss", "test_loss"):
            assert got[key] == pytest.approx(want[key], rel=5e-2)
        for key in ("train_accuracy", "test_accuracy"):
            assert got[key] == pytest.approx(want[key], abs=1.5)
    resumed_state, straight_state = final_params(old_run), final_params(straight_run[0])
    assert int(resumed_state.step) == int(straight_state.step) == 3 * 8  # 1,000 examples, batch 128
    # The fixture's epochs ran im2col's convolutions; here they may be oneDNN's (another rounding):
    # all weights together were 1.8 % apart, while small leaves (biases of 10-20 numbers) drift by
    # up to 15 %, so the distance is taken over all of them (a fresh init is off by the weights'
    # whole size); bitwise resume is tested on one machine (the kill points, SIGKILL).
    leaves = [jax.tree_util.tree_leaves(s.params) for s in (resumed_state, straight_state)]
    got, want = (np.concatenate([np.ravel(x) for x in tree]) for tree in leaves)
    assert np.linalg.norm(got - want) <= 0.1 * np.linalg.norm(want)


def run(out, mnist, **extra):
    return train(
        small_recipe(**extra.pop("recipe", {})),
        mnist,
        out,
        seed=extra.pop("seed", 1),
        train_examples=SUBSET,
        log=extra.pop("log", lambda s: None),
        **extra,
    )


def cli(argv, capsys):
    """``jax-mnist ARGV`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def flip_a_byte(checkpoint_dir):
    """One byte of the largest array file of a checkpoint's weights (what every reader restores)."""
    if (checkpoint_dir / "weights").is_dir():
        checkpoint_dir = checkpoint_dir / "weights"
    data = max(
        (p for p in checkpoint_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


# --------------------------------------------------------------------------- refusing before writing


@pytest.mark.parametrize(
    "leftover",
    [
        {"notes.txt": "mine"},
        {"metrics.jsonl": '{"loss": 1}\n'},  # someone else's metrics
        {"checkpoints/7/x": "", "checkpoints/8/x": ""},  # stale checkpoints of another run
    ],
)
def test_a_foreign_directory_is_refused_untouched(leftover, mnist, tmp_path):
    out = tmp_path / "foreign"
    for name, text in leftover.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    for resume in (False, True):
        with pytest.raises(
            RunError, match="not empty and not a jax-mnist run .no config.json.; refusing to write"
        ):
            run(out, mnist, resume=resume)
    assert snapshot(out) == before


def test_a_different_run_names_the_fields_that_differ(finished, mnist):
    out, _ = finished
    before = snapshot(out)
    with pytest.raises(
        RunError, match=r"holds a different run \(recipe.lr: 0.1 there, 0.2 asked; seed: 1 there, 2 asked\)"
    ):
        run(out, mnist, recipe={"lr": 0.2}, seed=2, resume=True)
    assert snapshot(out) == before


def test_a_finished_step_lr_run_extends_to_more_epochs(finished, mnist):
    out, history = finished
    extended = run(out, mnist, recipe={"epochs": 4}, resume=True)
    assert numbers(extended[:3]) == numbers(history) and [r["epoch"] for r in extended] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["recipe"]["epochs"] == 4


def test_config_records_the_lowering_and_a_resume_under_another_says_so(finished, mnist):
    """config.json's device.conv_impl is what "auto" resolved to; a run whose epochs ran with
    other convolutions (here: as jax-mnist 0.2.0 wrote it, without the field, when "auto" was
    im2col on CPU) continues, and the log says the two parts differ in rounding."""
    out, _ = finished
    config = json.loads((out / "config.json").read_text())
    now = "onednn" if onednn.available() else "im2col"
    assert config["device"]["conv_impl"] == now
    del config["device"]["conv_impl"]
    (out / "config.json").write_text(json.dumps(config))
    logged = []
    run(out, mnist, recipe={"epochs": 4}, resume=True, log=logged.append)
    notes = [line for line in logged if line.startswith("note: epochs 1-3")]
    if now == "im2col":
        assert notes == []
    else:
        assert notes == [
            f"note: epochs 1-3 of {out} ran with im2col convolutions, the rest runs with onednn: the "
            "same function in another rounding, so not bit-equal to an uninterrupted run "
            "(JAX_MNIST_ONEDNN=0 makes conv_impl auto take im2col)"
        ]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
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


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_a_corrected_one(mnist, tmp_path):
    out = tmp_path / "early"
    with pytest.raises(RunError, match="batch size 5000 is larger"):
        run(out, mnist, recipe={"batch_size": 5000})
    assert not out.exists()  # checked before anything was written
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps({"recipe": {"name": "final", "lr": 9.0}, "seed": 1})
    )  # killed early
    assert [r["epoch"] for r in run(out, mnist, recipe={"epochs": 1})] == [1]


def test_history_shorter_than_the_checkpoints_is_restored_from_their_records(finished, mnist):
    """metrics.jsonl is a copy of what the checkpoints record: a lost tail is written back."""
    out, history = finished
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n")
    assert rundir.read_run(out).history == history  # readers see the committed epochs already
    assert (out / "metrics.jsonl").read_text().splitlines() == lines[:1]  # ... without writing
    run(out, mnist, resume=True)
    assert (out / "metrics.jsonl").read_text().splitlines() == lines


def test_history_that_contradicts_the_checkpoints_is_refused(finished, mnist):
    out, _ = finished
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows[1]["test_accuracy"] = 12.5
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(out)
    with pytest.raises(
        RunError, match="epoch 2 differs from what the checkpoint of epoch 3 recorded: nothing was changed"
    ):
        run(out, mnist, resume=True)
    assert snapshot(out) == before


# --------------------------------------------------------------------------- the lock


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from jax_mnist.rundir import RunError, locked
    if len(sys.argv) > 3:  # a start line: race only once every racer has imported (a loaded
        print("ready", flush=True)  # machine can start processes seconds apart)
        while not Path(sys.argv[3]).exists():
            time.sleep(0.01)
    try:
        with locked(Path(sys.argv[1])):
            print("won", flush=True)
            time.sleep(float(sys.argv[2]))
    except RunError as e:
        print("lost:", e, flush=True)
""")


@pytest.mark.slow  # spawns processes
def test_a_directory_in_use_is_refused_and_a_stale_lock_is_taken(tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder = spawn([sys.executable, "-c", LOCK_HOLDER, str(out), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "won"
        with pytest.raises(RunError, match=f"in use by process {holder.pid}"):
            with locked(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").exists()  # left by the killed process, with its pid in it
    with locked(out):  # the kernel released its lock: the file is stale
        assert (out / ".lock").read_text() == str(os.getpid())
    assert not (out / ".lock").exists()


@pytest.mark.slow  # spawns processes
def test_two_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    out = tmp_path / "race"
    out.mkdir()
    for attempt in range(3):
        (out / ".lock").write_text("999999999")  # a stale lock of a process long gone
        go = tmp_path / f"go-{attempt}"
        racers = [
            spawn(
                [sys.executable, "-c", LOCK_HOLDER, str(out), "4", str(go)], stdout=subprocess.PIPE, text=True
            )
            for _ in range(4)
        ]
        assert all(r.stdout.readline().strip() == "ready" for r in racers)
        go.touch()
        results = [r.communicate(timeout=60)[0].strip() for r in racers]
        assert sum(r == "won" for r in results) == 1, results
        assert all(r == "won" or r.startswith("lost:") and "in use by process" in r for r in results)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_a_lock_file_left_at_a_runs_start_does_not_block_the_directory(mnist, tmp_path):
    out = tmp_path / "killed-at-start"
    out.mkdir()
    (out / ".lock").write_text("")  # kill -9 (or a full disk) before config.json was written
    assert [r["epoch"] for r in run(out, mnist, recipe={"epochs": 1})] == [1]


# --------------------------------------------------------------------------- reading never changes a run


def test_reading_a_run_whose_tree_does_not_fit_changes_nothing(finished, mnist_data_dir, tmp_path, capsys):
    """An upgrade (or an edited config) that changes the state's structure is not corruption."""
    out, _ = finished
    config = json.loads((out / "config.json").read_text())
    config["recipe"]["model"] = "model_6_gap"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    before = snapshot(out)
    image = tmp_path / "digit.png"
    from PIL import Image

    stroke = np.zeros((28, 28), np.uint8)
    stroke[4:24, 12:16] = 255  # a "1": a blank image would be refused before the run is read
    Image.fromarray(stroke).save(image)
    commands = [
        ["evaluate", out, "--data-dir", mnist_data_dir, "--no-download", "--out", tmp_path / "e.npz"],
        ["export", out, "--to", "pytorch", tmp_path / "m.pt"],
        ["predict", out, image],
        [
            *"train --recipe final --epochs 3 --batch-size 128 --set step_size=2".split(),
            *f"--set model=model_6_gap --train-examples {SUBSET} --resume --no-download".split(),
            *("--out", out, "--data-dir", mnist_data_dir),
        ],
    ]
    for argv in commands:
        code, _, err = cli(argv, capsys)
        assert code == 2, argv
        lines = [line for line in err.strip().splitlines() if not line.startswith("[jax_mnist.data]")]
        assert len(lines) == 1 and "does not fit what this code builds" in lines[0], err
        assert f"written by jax_mnist {jax_mnist.__version__}" in lines[0] and "optax" in lines[0]
        assert snapshot(out) == before, argv


def test_a_checkpoint_without_its_digest_is_skipped_by_readers_and_redone_by_training(
    old_run, straight_run, mnist
):
    digests = json.loads((old_run / "digests.json").read_text())
    del digests["checkpoints/2"]  # as if read between the checkpoint's save and its digest
    (old_run / "digests.json").write_text(json.dumps(digests))
    before = snapshot(old_run)
    warnings = []
    assert load_run(old_run, warn=warnings.append).epoch == 1
    assert (
        len(warnings) == 1
        and "checkpoints/2: no digest recorded" in warnings[0]
        and "left as it is" in warnings[0]
    )
    assert snapshot(old_run) == before
    logged = []
    resumed = run(old_run, mnist, resume=True, log=logged.append)  # epoch 2 counts as unfinished
    assert_continues_the_fixture(resumed, old_run, straight_run, kept_epochs=1)
    moved = list((old_run / "quarantine").iterdir())
    assert len(moved) == 1 and (moved[0] / "default").is_dir() and any("moved to" in line for line in logged)


def test_a_flipped_byte_readers_change_nothing_training_moves_it_aside(finished, mnist, tmp_path, capsys):
    out, history = finished
    flip_a_byte(out / "checkpoints" / "3")
    corrupt = snapshot(out / "checkpoints" / "3")
    before = snapshot(out)
    warnings = []
    assert load_run(out, warn=warnings.append).epoch == 2  # "last": the newest good one
    assert len(warnings) == 1 and "checkpoints/3" in warnings[0]
    with pytest.raises(checkpoints.CorruptCheckpoint, match="checkpoints/3"):
        load_run(out, 3)
    code, _, err = cli(["export", out, "--to", "stablehlo", tmp_path / "m.shlo", "--checkpoint", "3"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "checkpoints/3" in err
    assert snapshot(out) == before
    logged = []
    resumed = run(out, mnist, resume=True, log=logged.append)
    warned = [line for line in logged if line.startswith("warning:")]
    assert (
        len(warned) == 1
        and "checkpoints/3" in warned[0]
        and "quarantine" in warned[0]
        and "\n" not in warned[0]
    )
    assert numbers(resumed) == numbers(history)  # epoch 3 run again from epoch 2: the same numbers
    (moved,) = (out / "quarantine").iterdir()
    assert {
        k: v for k, v in snapshot(moved).items() if k in corrupt
    } == corrupt  # the evidence, byte for byte
    assert (moved / "why.txt").read_text().startswith(str(out / "checkpoints" / "3"))


def test_a_flipped_byte_in_the_optimizer_state_stops_only_a_resume(finished, mnist):
    """Readers restore the weights alone; a training verifies the whole state before it goes on."""
    out, history = finished
    rest = out / "checkpoints" / "3" / "rest"
    data = max(
        (p for p in rest.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert load_run(out, 3).epoch == 3
    logged = []
    assert numbers(run(out, mnist, resume=True, log=logged.append)) == numbers(history)
    assert any("checkpoints/3" in line and "quarantine" in line for line in logged)
    assert len(list((out / "quarantine").iterdir())) == 1


def test_no_good_checkpoint_with_history_is_refused_and_nothing_moves(finished, mnist):
    out, _ = finished
    for epoch in ("2", "3"):
        flip_a_byte(out / "checkpoints" / epoch)
    before = snapshot(out)
    with pytest.raises(RunError, match="no checkpoint restores, and starting over would drop the 3 epochs"):
        run(out, mnist, resume=True)
    assert snapshot(out) == before


def test_a_truncated_digests_file_is_one_line_and_deletes_nothing(old_run, mnist_data_dir, capsys):
    text = (old_run / "digests.json").read_text()
    (old_run / "digests.json").write_text(text[: len(text) // 2])
    before = snapshot(old_run)
    code, _, err = cli(["evaluate", old_run, "--data-dir", mnist_data_dir, "--no-download"], capsys)
    assert code == 2 and "no checkpoint that restores and verifies" in err.strip().splitlines()[-1]
    assert snapshot(old_run) == before


def test_a_checkpoint_rotated_away_while_it_is_read(finished, monkeypatch):
    """A training keeps its last two checkpoints: a reader that loses the race tries again."""
    import orbax.checkpoint as ocp

    out, _ = finished
    restore, calls = ocp.CheckpointManager.restore, []

    def rotated_under_the_reader(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2 and step == 3:  # after reading its record, the step goes
            shutil.move(str(out / "checkpoints" / "3"), str(out.parent / "elsewhere"))
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", rotated_under_the_reader)
    assert load_run(out).epoch == 2


def test_best_checkpoint_and_load_run(straight_run):
    out, history = straight_run
    best_epoch = 1 + int(np.argmax([r["test_accuracy"] for r in history]))
    last = load_run(out)
    assert (last.seed, last.train_examples, last.epoch, last.recipe) == (1, SUBSET, 3, small_recipe())
    assert last.history == history and last.state.opt_state is None  # readers restore the weights only
    assert int(last.state.step) == 3 * 8  # 1,000 examples in batches of 128
    best = load_run(out, "best")
    assert best.epoch == best_epoch and [p.name for p in (out / "best").iterdir()] == [str(best_epoch)]
    with pytest.raises(RunError, match=r"no checkpoint of epoch 1; found \[2, 3\]"):
        load_run(out, 1)
    with pytest.raises(RunError, match="no such directory"):
        load_run(out / "missing")


# --------------------------------------------------------------------------- runs of the earlier format


def test_a_run_of_the_earlier_format_evaluates_and_resumes(old_run, straight_run, mnist):
    before = snapshot(old_run)
    loaded = load_run(old_run)
    assert loaded.epoch == 2 and [r["epoch"] for r in loaded.history] == [1, 2]
    assert snapshot(old_run) == before
    resumed = run(old_run, mnist, resume=True)
    assert_continues_the_fixture(resumed, old_run, straight_run, kept_epochs=2)


# --------------------------------------------------------------------------- an epoch committed once


class Killed(BaseException):
    """kill -9 at a point of the commit: nothing after it runs (cleanup code catches Exception)."""


def _kill_at(monkeypatch, point: str, epoch: int = 2):
    """Stop the process at ``point`` of the commit of ``epoch``, leaving the files as they are."""
    store_save, write_metrics = checkpoints.CheckpointStore.save, rundir.write_metrics

    def save(self, at, state, record):
        if at == epoch and self.kind == "checkpoints" and point == "before the checkpoint":
            raise Killed
        store_save(self, at, state, record)
        if at == epoch and self.kind == "checkpoints" and point == "inside the checkpoint's rename":
            # orbax writes a step to a temporary directory and renames it when complete: undo the rename
            os.rename(self.directory / str(at), self.directory / f"{at}.orbax-checkpoint-tmp-123")
            raise Killed
        if at == epoch and self.kind == "checkpoints" and point == "between the checkpoint and the best one":
            raise Killed
        if at == epoch and self.kind == "best" and point == "between the best one and metrics.jsonl":
            raise Killed

    def metrics(path, rows):
        write_metrics(path, rows)
        if len(rows) == epoch and point == "after metrics.jsonl":
            raise Killed

    monkeypatch.setattr(checkpoints.CheckpointStore, "save", save)
    monkeypatch.setattr(rundir, "write_metrics", metrics)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [
        "before the checkpoint",
        "inside the checkpoint's rename",
        "between the checkpoint and the best one",
        "between the best one and metrics.jsonl",
        "after metrics.jsonl",
    ],
)
def test_a_kill_at_any_point_of_an_epochs_commit_resumes_bitwise(
    point, straight_run, mnist, tmp_path, monkeypatch
):
    out_straight, history = straight_run
    assert history[1]["test_accuracy"] > history[0]["test_accuracy"]  # epoch 2 commits a best checkpoint too
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        _kill_at(patch, point)
        with pytest.raises(Killed):
            run(out, mnist)
    committed = rundir.read_run(out).history  # what a reader sees after the crash
    assert numbers(committed) in (numbers(history[:1]), numbers(history[:2]))
    assert len(committed) == max(
        checkpoints.committed_epochs(out / "checkpoints")
    )  # history and checkpoints agree
    resumed = run(out, mnist, resume=True)
    assert numbers(resumed) == numbers(history)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(out), final_params(out_straight))
    assert (out / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in resumed)
    assert_events_mirror_metrics(
        out
    )  # TensorBoard sees every epoch once ("after metrics.jsonl": before its events)
    assert load_run(out, "best").epoch == 1 + int(np.argmax([r["test_accuracy"] for r in resumed]))
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.isdigit()]  # no temporary left


# --------------------------------------------------------------------------- writes


def test_a_failing_atomic_write_leaves_nothing_and_names_the_target(tmp_path):
    target = tmp_path / "figures" / "out.png"
    target.parent.mkdir()

    def fails_half_way(f):
        f.write(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=rf"^{target}: cannot write \(No space left on device\)$"):
        write_atomically(target, fails_half_way)
    assert list(target.parent.iterdir()) == []
    write_atomically(target, b"whole")
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, lambda f: (_ for _ in ()).throw(KeyboardInterrupt))
    assert [p.name for p in target.parent.iterdir()] == ["out.png"] and target.read_bytes() == b"whole"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_open_would_give(tmp_path, umask):
    """0666 less the umask, as `open` gives (mkstemp alone would leave every file 0600)."""
    previous = os.umask(umask)
    try:
        written = write_atomically(tmp_path / "report.md", "text\n")
        with open(tmp_path / "by-open.md", "w") as f:
            f.write("text\n")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == (tmp_path / "by-open.md").stat().st_mode & 0o777
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_disk_full_at_the_start_of_a_run_is_one_line_and_leaves_no_lock(mnist, tmp_path, monkeypatch):
    out = tmp_path / "full-at-start"

    def no_space(path, content):
        raise WriteError(f"{path}: cannot write (No space left on device)")

    with monkeypatch.context() as patch:
        patch.setattr(rundir, "write_atomically", no_space)
        with pytest.raises(WriteError, match="config.json: cannot write"):
            run(out, mnist)
    assert not (out / ".lock").exists()
    assert [r["epoch"] for r in run(out, mnist, recipe={"epochs": 1})] == [1]  # the next run is not refused


def test_outputs_never_land_on_a_runs_files_and_never_replace_without_force(
    finished, mnist_data_dir, tmp_path, capsys
):
    out, _ = finished
    before = snapshot(out)
    data = ["--data-dir", mnist_data_dir, "--no-download"]
    for argv in (
        ["evaluate", out, "--out", out / "config.npz", *data],
        ["evaluate", out, "--out", out / "checkpoints" / "x.npz", *data],
        ["export", out, "--to", "pytorch", out / "config.json"],
        ["export", out, "--to", "stablehlo", out / "metrics.jsonl"],
        ["export", out, "--to", "onnx", out / "events.out.tfevents.epoch-00001.jax-mnist", "--force"],
    ):
        code, _, err = cli(argv, capsys)
        assert code == 2 and "is a file of the run directory" in err and len(err.strip().splitlines()) == 1, (
            argv
        )
    assert snapshot(out) == before
    model = tmp_path / "model.pt"
    model.write_bytes(b"mine")
    code, _, err = cli(["export", out, "--to", "pytorch", model], capsys)
    assert code == 2 and "exists; pass --force" in err and model.read_bytes() == b"mine"
    code, _, _ = cli(["export", out, "--to", "pytorch", model, "--force"], capsys)
    assert code == 0 and model.read_bytes() != b"mine"
    code, _, _ = cli(["evaluate", out, *data], capsys)
    assert code == 0
    code, _, err = cli(["evaluate", out, *data], capsys)
    assert code == 2 and "predictions-last.npz: exists; pass --force" in err
    assert cli(["evaluate", out, *data, "--force"], capsys)[0] == 0
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".partial" in p.name]


def test_a_failed_evaluation_write_leaves_no_partial_file(
    finished, mnist_data_dir, tmp_path, capsys, monkeypatch
):
    out, _ = finished
    target = tmp_path / "eval" / "p.npz"
    target.parent.mkdir()
    monkeypatch.setattr(
        os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    )
    code, _, err = cli(
        ["evaluate", out, "--out", target, "--data-dir", mnist_data_dir, "--no-download"], capsys
    )
    assert (
        code == 2
        and err.strip().splitlines()[-1]
        == f"jax-mnist evaluate: error: {target}: cannot write (No space left on device)"
    )
    assert list(target.parent.iterdir()) == []


# How a full disk reaches us: an OSError, or (measured, orbax 0.12 with tensorstore) a ValueError.
FULL_DISK = [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 6223 bytes to '
        "file 11: No space left on device [os_error_code='28']"
    ),
]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
@pytest.mark.parametrize("error", FULL_DISK, ids=["OSError", "tensorstore"])
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(
    error, mnist, tmp_path, monkeypatch
):
    import orbax.checkpoint as ocp

    out = tmp_path / "full"
    save = ocp.CheckpointManager.save

    def save_until_the_disk_fills(self, step, *args, **kwargs):
        if step == 2:
            (self.directory / "2.orbax-checkpoint-tmp-1").mkdir()  # what a save leaves behind when it fails
            raise error
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_fills)
    with pytest.raises(
        WriteError,
        match=r"checkpoints/2: disk full while writing the checkpoint of epoch 2 \([\d,]+ bytes free\)",
    ):
        run(out, mnist)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert load_run(out).epoch == 1  # the previous checkpoint is intact and verifies


@pytest.mark.slow  # trains an epoch
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_disk_full_through_the_cli_is_one_line_though_orbax_threads_log_after_it(
    verbose, mnist_data_dir, tmp_path, monkeypatch, capfd, caplog
):
    """Measured on a 300 KiB tmpfs: after the save fails, orbax's writer thread logs a traceback
    through absl, and asyncio logs each unretrieved task error; with --verbose they are shown."""
    import logging
    import threading

    import orbax.checkpoint as ocp

    late = []

    def fails_then_logs(self, step, *args, **kwargs):
        def log_later():
            time.sleep(0.2)
            logging.getLogger("absl").error(
                "_SignalingThread.run() raised an exception", exc_info=FULL_DISK[1]
            )
            logging.getLogger("asyncio").error("Task exception was never retrieved")

        late.append(threading.Thread(target=log_later))
        late[-1].start()
        raise FULL_DISK[1]

    monkeypatch.setattr(ocp.CheckpointManager, "save", fails_then_logs)
    out = tmp_path / "full"
    argv = ["train", "--recipe", "final", "--epochs", "1", "--train-examples", SUBSET, "--out", out]
    argv += ["--data-dir", mnist_data_dir, "--no-download"] + (["--verbose"] if verbose else [])
    assert main([str(a) for a in argv]) == 2
    for thread in late:
        thread.join()
    err = capfd.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("jax-mnist train: error:")]
    assert len(ours) == 1 and "disk full while writing the checkpoint of epoch 1" in ours[0]
    # pytest's own handler takes the records that reach the root logger (stderr outside pytest)
    libraries = [r.getMessage() for r in caplog.records if r.name in ("absl", "asyncio")]
    if verbose:
        assert libraries == [
            "_SignalingThread.run() raised an exception",
            "Task exception was never retrieved",
        ]
    else:
        assert libraries == []
        assert "_SignalingThread" not in err and "Traceback" not in err and "asyncio" not in err


def test_multi_seed_resume_starts_seeds_that_have_not_started(mnist, tmp_path):
    with pytest.raises(RunError, match="none of the run directories exists yet"):
        train_seeds(
            small_recipe(), mnist, {1: tmp_path / "a", 2: tmp_path / "b"}, train_examples=SUBSET, resume=True
        )


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


def test_a_flipped_byte_under_a_new_tree_is_reported_as_a_mismatch_not_deleted(finished):
    """The structure is compared before any byte is decoded: a tree mismatch is never corruption."""
    out, _ = finished
    like = rundir.weights_like(small_recipe())
    wrong = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype), like
    )
    store = checkpoints.CheckpointStore(out)
    try:
        with pytest.raises(TreeMismatch, match="found, float32"):
            config = json.loads((out / "config.json").read_text())
            # a checkpoint of format 2 never asks for the whole state's tree
            store.restore_weights(3, wrong, config, lambda: pytest.fail("the state tree was asked for"))
    finally:
        store.close()
    assert checkpoints.committed_epochs(out / "checkpoints") == [2, 3]


def assert_events_mirror_metrics(out) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    read = tensorboard_scalars(out)
    for tag, key in [("train/loss", "train_loss"), ("test/accuracy", "test_accuracy"), ("lr", "lr")]:
        assert read[tag] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows]  # every epoch once


def test_tensorboard_events_mirror_the_history_through_quarantine_backfill_and_extension(finished, mnist):
    from jax_mnist.events import event_file

    out, history = finished
    assert_events_mirror_metrics(out)
    flip_a_byte(out / "checkpoints" / "3")
    written_for_epoch_3 = event_file(out, 3).read_bytes()
    run(out, mnist, resume=True)  # epoch 3 is trained again
    assert_events_mirror_metrics(out)
    (moved,) = (out / "quarantine").iterdir()
    assert (moved / event_file(out, 3).name).read_bytes() == written_for_epoch_3  # beside its checkpoint
    event_file(out, 2).unlink()  # as if killed between the commit of epoch 2 and its event file
    run(out, mnist, resume=True, recipe={"epochs": 4})  # extended by one epoch
    assert_events_mirror_metrics(out)
    assert sorted(p.name for p in out.glob("events.out.tfevents.*"))[-1] == event_file(out, 4).name
