"""TensorBoard event files (issue 36): what TensorBoard's own reader finds in them."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jax_mnist import events
from tests.helpers import tensorboard_scalars

ROWS = [
    {
        "epoch": e,
        "lr": 0.1 / e,
        "train_loss": 1.0 / e,
        "train_accuracy": 90 + e,
        "test_loss": 0.5 / e,
        "test_accuracy": 95 + e,
        "epoch_seconds": 3.0 + e,
    }
    for e in (1, 2, 3)
]
RECIPE = {
    "name": "final",
    "model": "model_8_dropout_maxpool",
    "lr": 0.1,
    "nesterov": False,
    "dropout_rate": None,
}


def test_each_epoch_is_read_back_as_written(tmp_path):
    for row in ROWS:
        events.write_epoch(tmp_path, row, RECIPE if row["epoch"] == 1 else None)
    assert sorted(events.event_files(tmp_path)) == [1, 2, 3]
    read = tensorboard_scalars(tmp_path)
    assert set(read) == {"train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "epoch_seconds"}
    for tag, key in [("train/loss", "train_loss"), ("test/accuracy", "test_accuracy"), ("lr", "lr")]:
        assert read[tag] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in ROWS]


def test_a_screening_rows_validation_figures_and_the_recipe_as_hparams(tmp_path):
    row = {k.replace("test_", "val_"): v for k, v in ROWS[0].items()}
    events.write_epoch(tmp_path, row, RECIPE)
    assert {"val/loss", "val/accuracy"} <= set(tensorboard_scalars(tmp_path))
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    plugins = accumulator.PluginTagToContent("hparams")
    assert set(plugins) == {"_hparams_/experiment", "_hparams_/session_start_info"}
    start = plugins["_hparams_/session_start_info"]
    assert b"model_8_dropout_maxpool" in start and b"nesterov" in start and b"dropout_rate" not in start


def test_a_file_is_written_whole_and_a_failed_write_leaves_nothing(tmp_path):
    from jax_mnist.files import WriteError

    target = tmp_path / "gone"
    with pytest.raises(WriteError, match="gone/events.out.tfevents.epoch-00001.jax-mnist"):
        events.write_epoch(target, ROWS[0])
    assert not target.exists()
