"""Every JSON file of a run is checked before use (issue 29): a malformed one is one line naming
the file and the field; every file jax-mnist wrote, old formats included, passes."""

import json
from pathlib import Path

import pytest

from jax_mnist.schema import SchemaError, check_config, check_metrics_row, check_record

REPO = Path(__file__).resolve().parent.parent
RUN_DIRS = sorted(p.parent for p in (REPO / "results").rglob("config.json")) + [
    REPO / "tests" / "fixtures" / "run-0.1.0"
]
ROW = {
    "epoch": 1,
    "lr": 0.1,
    "train_loss": 1.8,
    "train_accuracy": 46.0,
    "test_loss": 1.9,
    "epoch_seconds": 3.2,
}


def test_every_committed_run_passes():
    assert len(RUN_DIRS) > 100
    for run in RUN_DIRS:
        check_config(str(run / "config.json"), json.loads((run / "config.json").read_text()))
        for number, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
            check_metrics_row(f"{run}/metrics.jsonl, line {number}", json.loads(line))


def config():
    return json.loads((RUN_DIRS[0] / "config.json").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.clear() or c.update(recipe=[]), "field 'recipe' must be an object, found list"),
        (lambda c: c.pop("seed"), "field 'seed' is missing"),
        (lambda c: c.update(seed="1"), "field 'seed' must be a whole number, found str '1'"),
        (lambda c: c.update(seed=True), "field 'seed' must be a whole number, found bool True"),
        (lambda c: c.update(train_examples=0), "field 'train_examples' must be a whole number >= 1"),
        (lambda c: c.update(versions=[]), "field 'versions' must be an object"),
        (
            lambda c: c["recipe"].update(batch_size="128"),
            "field 'recipe': recipe .*batch_size must be a whole",
        ),
        (
            lambda c: c["recipe"].update(colour=1),
            r"field 'recipe' holds fields this version does not know: \['colour'\]",
        ),
        (lambda c: c["recipe"].pop("model"), "field 'recipe.model' is missing"),
    ],
)
def test_a_malformed_config_names_the_file_and_the_field(change, message):
    value = config()
    change(value)
    with pytest.raises(SchemaError, match=f"^somewhere/config.json: {message}"):
        check_config("somewhere/config.json", value)


def test_a_config_that_is_not_an_object():
    with pytest.raises(SchemaError, match="^c.json: its content must be an object, found list"):
        check_config("c.json", [1, 2])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**ROW, "test_accuracy": 48.4, "epoch": "1"}, "field 'epoch' must be a whole number >= 1"),
        ({**ROW, "test_accuracy": 48.4, "epoch": 0}, "field 'epoch' must be a whole number >= 1"),
        ({**ROW, "test_accuracy": "high"}, "field 'test_accuracy' must be a number, found str 'high'"),
        (ROW, "field 'test_accuracy' is missing"),
        (
            {k: v for k, v in ROW.items() if k != "test_loss"},
            r"field 'test_accuracy' \(or 'val_accuracy'\) is missing",
        ),
        ({**ROW, "test_accuracy": 48.4, "lr": None}, "field 'lr' must be a number, found NoneType None"),
        ([1, 2], "its content must be an object"),
    ],
)
def test_a_malformed_metrics_row_names_the_line_and_the_field(row, message):
    with pytest.raises(SchemaError, match=f"^m.jsonl, line 2: ({message})"):
        check_metrics_row("m.jsonl, line 2", row)


def test_rows_of_a_screening_run_and_nan_losses_pass():
    check_metrics_row(
        "m", {**{k: v for k, v in ROW.items() if k != "test_loss"}, "val_loss": 1.0, "val_accuracy": 5}
    )
    check_metrics_row(
        "m", {**ROW, "test_accuracy": 48.4, "train_loss": float("nan")}
    )  # the NaN check stops it


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": "24"}, "field 'step' must be a whole number"),
        ({"history": {}}, "field 'history' must be a list"),
        ({"digests": []}, "field 'digests' must be an object"),
        ({"digests": {"weights": 3}}, "field 'digests.weights' must be text"),
        (
            {"history": [{**ROW, "test_accuracy": "x"}]},
            r"history\[0\]: field 'test_accuracy' must be a number",
        ),
    ],
)
def test_a_malformed_checkpoint_record_names_the_field(change, message):
    record = {"format": 2, "epoch": 1, "step": 8, "history": [{**ROW, "test_accuracy": 48.4}], "digests": {}}
    check_record("r", record)
    with pytest.raises(SchemaError, match=f"^r(: |, ){message}"):
        check_record("r", {**record, **change})
