"""A damaged run never crashes a command (issue 29): for each file of a run and each way it can be
damaged, the commands that read that file (evaluate, predict, export, report, train --resume) end
with status 0 or 2, print the project's lines only (no traceback, no library dump), and the
readers leave every byte of the run as it was; a resume may move a checkpoint to quarantine/,
never lose its bytes.

The files: the run's own (config.json, metrics.jsonl) and every file of its newest checkpoint
(what "last" readers and --resume read), one of orbax's data chunks standing for all of them, and
three files standing for the ``rest`` item's (the same orbax handler as ``weights``, read by
--resume alone).
Which command reads which file (``READERS``) is itself tested: report reads no checkpoint, and
evaluate, predict and export read no checkpoint's ``rest`` item (the optimizer state), so each
runs where a damage can reach it (the whole sweep takes minutes, not a quarter of an hour).
"""

import ast
import json
import shutil

import pytest
from PIL import Image

from jax_mnist.cli import main
from tests.helpers import SMALL, SUBSET, snapshot

pytestmark = pytest.mark.slow  # trains (the session's run) and runs five commands per damaged copy

NEWEST = f"checkpoints/{SMALL['epochs']}"
ITEM_FILES = (
    "_METADATA",
    "_sharding",
    "commit_success.txt",
    "manifest.ocdbt",
    "array_metadatas/process_0",
    "d/*",
    "ocdbt.process_0/manifest.ocdbt",
    "ocdbt.process_0/d/*",
)
# ``rest`` is written and read by the same orbax handler as ``weights``, and only ``train --resume``
# reads it: its metadata, manifest and a data chunk stand for its other files.
REST_FILES = ("_METADATA", "manifest.ocdbt", "ocdbt.process_0/d/*")
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    f"{NEWEST}/_CHECKPOINT_METADATA",
    f"{NEWEST}/commit_success.txt",
    f"{NEWEST}/record/metadata",
    f"{NEWEST}/record/commit_success.txt",
    *(f"{NEWEST}/weights/{name}" for name in ITEM_FILES),
    *(f"{NEWEST}/rest/{name}" for name in REST_FILES),
)
JSON_FILES = tuple(
    f
    for f in RUN_FILES
    if f.endswith(("config.json", "metrics.jsonl", "METADATA", "_sharding", "process_0", "record/metadata"))
)
# (file, field, value): a field of ours given a value of the wrong type or out of its range.
WRONG_FIELDS = (
    ("config.json", "recipe", "final"),
    ("config.json", "seed", "1"),
    ("config.json", "train_examples", 0.5),
    ("config.json", "recipe.batch_size", "128"),
    ("config.json", "recipe.epochs", -3),
    ("config.json", "recipe.model", 8),
    ("metrics.jsonl", "epoch", "2"),
    ("metrics.jsonl", "test_accuracy", "high"),
    ("metrics.jsonl", "lr", None),
    ("metrics.jsonl", "train_loss", [1.0]),
    (f"{NEWEST}/record/metadata", "step", "24"),
    (f"{NEWEST}/record/metadata", "history", {}),
    (f"{NEWEST}/record/metadata", "digests", []),
    (f"{NEWEST}/record/metadata", "history.0.test_accuracy", "high"),
)
CASES = [
    *((f, damage) for f in RUN_FILES for damage in ("missing", "empty", "truncated", "garbage")),
    *((f, "wrong shape") for f in JSON_FILES),
    *((f, f"{field}={value!r}") for f, field, value in WRONG_FIELDS),
]
COMMANDS = ("evaluate", "predict", "export", "report", "train --resume")


def readers(pattern: str) -> tuple[str, ...]:
    """The commands that read the file ``pattern`` names (test_readers_of_a_checkpoint_... below)."""
    if pattern in ("config.json", "metrics.jsonl"):
        return COMMANDS
    if "/rest/" in pattern:  # the optimizer state: a resume alone restores it
        return ("predict", "train --resume")  # predict: one reader, to show that it is not read
    return ("evaluate", "predict", "export", "train --resume")


# What the project itself prints on stderr; anything else (a traceback, a library's log) fails.
OWN_LINES = ("warning: ", "jax-mnist ", "[jax_mnist.data] ", "training ", "epoch ")


def resolve(run, pattern: str):
    """The file a pattern names in ``run``: ``d/*`` is the largest of orbax's chunks there."""
    if not pattern.endswith("/*"):
        return run / pattern
    return max((run / pattern[:-2]).iterdir(), key=lambda p: p.stat().st_size)


def set_field(document, dotted: str, value):
    *parents, last = dotted.split(".")
    for key in parents:
        document = document[int(key) if isinstance(document, list) else key]
    document[int(last) if isinstance(document, list) else last] = value


def damage(path, how: str) -> None:
    raw = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(bytes((i * 97 + 13) % 256 for i in range(max(len(raw), 16))))
    elif how == "wrong shape":  # valid JSON, but a list where an object is (in metrics.jsonl: a row)
        lines = raw.decode().splitlines()
        path.write_text("\n".join([*lines[:-1], "[1, 2]"]) + "\n" if path.suffix == ".jsonl" else "[]")
    else:
        field, _, value = how.partition("=")
        value = ast.literal_eval(value)  # a literal of WRONG_FIELDS, as its case id shows it
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in raw.decode().splitlines()]
            set_field(rows[-1], field, value)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            document = json.loads(raw)
            set_field(document, field, value)
            path.write_text(json.dumps(document))


def commands(run, tmp_path, data_dir, image):
    """The five commands that read a run, each writing (if at all) outside it; ``train --resume``
    last, as it may move a checkpoint to quarantine/."""
    data = ["--data-dir", str(data_dir), "--no-download"]
    recipe = ["--recipe", "final", "--seed", "1", "--epochs", str(SMALL["epochs"])]
    recipe += ["--batch-size", str(SMALL["batch_size"]), "--set", f"step_size={SMALL['step_size']}"]
    return {
        "evaluate": ["evaluate", run, "--out", tmp_path / "evaluation", "--force", *data],
        "predict": ["predict", run, image],
        "export": ["export", run, "--to", "stablehlo", tmp_path / "model.shlo", "--force"],
        "report": ["report", run, "--out", tmp_path / "report"],
        "train --resume": ["train", *recipe, "--train-examples", SUBSET, "--out", run, "--resume", *data],
    }


@pytest.fixture(scope="module")
def digit(tmp_path_factory, test_images_raw):
    path = tmp_path_factory.mktemp("digit") / "digit.png"
    Image.fromarray(test_images_raw[0, :, :, 0]).save(path)
    return path


@pytest.mark.parametrize(("pattern", "how"), CASES, ids=[f"{f}-{how}" for f, how in CASES])
def test_every_command_on_a_damaged_run(pattern, how, straight_run, mnist_data_dir, digit, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(straight_run[0], run)
    target = resolve(run, pattern)
    damage(target, how)
    damaged = None if how == "missing" else target.read_bytes()
    before = snapshot(run)
    for name, argv in commands(run, tmp_path, mnist_data_dir, digit).items():
        if name not in readers(pattern):
            continue
        code = main([str(a) for a in argv])
        err = capfd.readouterr().err
        foreign = [line for line in err.splitlines() if line.strip() and not line.startswith(OWN_LINES)]
        assert code in (0, 2), f"{name}: exit status {code}\n{err}"
        assert not foreign, f"{name}: printed what is not the project's:\n{err}"
        if name != "train --resume":
            assert snapshot(run) == before, f"{name} changed the run"
    if damaged:  # the evidence (an empty file holds none): the damaged bytes in place, or under quarantine/
        kept = [p for p in run.rglob(target.name) if p.is_file() and p.read_bytes() == damaged]
        assert kept, f"the damaged {pattern} is gone"


def test_a_truncated_checkpoint_is_one_warning_and_verbose_shows_the_library_detail(
    straight_run, digit, tmp_path, capfd
):
    run = tmp_path / "run"
    shutil.copytree(straight_run[0], run)
    damage(resolve(run, f"{NEWEST}/weights/ocdbt.process_0/d/*"), "truncated")
    argv = ["predict", str(run), str(digit)]
    assert main(argv) == 0
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: {run}/{NEWEST}: unreadable checkpoint (ValueError: "
    )
    assert "TensorStore" not in err[0] and "skipped (left as it is)" in err[0]
    assert main(["--verbose", *argv]) == 0
    verbose = capfd.readouterr().err
    assert (
        f"--- detail of the checkpoint of epoch {SMALL['epochs']} ---" in verbose and "Traceback" in verbose
    )
    assert verbose.rstrip().splitlines()[-1].startswith("warning: ")  # the same line, after the detail


def test_readers_of_a_checkpoint_read_neither_its_rest_nor_report_any_checkpoint(
    straight_run, mnist_data_dir, digit, tmp_path, capsys
):
    """What ``readers`` relies on: with every checkpoint's rest/ item removed, evaluate, predict and
    export give what they give on the whole run; with no checkpoint at all, report does."""

    def outputs(run, names):
        """What each command prints and writes, the run's path taken out."""
        out = tmp_path / "outputs" / run.name
        out.mkdir(parents=True, exist_ok=True)
        found = {}
        for name, argv in commands(run, out, mnist_data_dir, digit).items():
            if name in names:
                assert main([str(a) for a in argv]) == 0
                found[name] = capsys.readouterr().out.replace(str(run), "RUN").replace(str(out), "OUT")
        written = [out / "evaluation.json", out / "report" / "report.md"]
        found.update({p.name: p.read_text().replace(str(run), "RUN") for p in written if p.exists()})
        return found

    whole, without_rest, without_checkpoints = (tmp_path / n for n in ("whole", "no-rest", "no-checkpoints"))
    for run in (whole, without_rest, without_checkpoints):
        shutil.copytree(straight_run[0], run)
    for rest in without_rest.glob("*/*/rest"):
        shutil.rmtree(rest)
    for folder in ("checkpoints", "best"):
        shutil.rmtree(without_checkpoints / folder)
    readers_of_weights = ("evaluate", "predict", "export")
    assert outputs(without_rest, readers_of_weights) == outputs(whole, readers_of_weights)
    report = ("report", "report.md")  # what report prints and writes
    reported = [outputs(run, ("report",)) for run in (without_checkpoints, whole)]
    assert [{k: found[k] for k in report} for found in reported] == [{k: reported[1][k] for k in report}] * 2
