import json

import pytest

from jax_mnist.bench import format_all_row
from jax_mnist.cli import main
from jax_mnist.engine import ProgramConfig, programs_for
from jax_mnist.recipes import get_recipe, with_overrides


@pytest.mark.slow  # spawns processes (cold and warm compiles)
def test_bench_times_the_epoch_chunk_program_training_runs(tmp_path):
    path = tmp_path / "bench.json"
    argv = "bench --recipe model_4_batchnorm --batch-size 256 --steps 3 --warmup 1 --no-epoch --compare-torch"
    assert main([*argv.split(), "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    jax_side = result["jax"]
    assert "train_chunk" in jax_side["program"]
    # Timed as training calls it: a tenth of an epoch's full batches a call, and one step a call.
    programs = programs_for(
        ProgramConfig(with_overrides(get_recipe("model_4_batchnorm"), {"batch_size": 256}), 60_000)
    )
    assert jax_side["train_chunk"]["steps_per_call"] == programs.chunks(60_000)[0][1] == 24
    assert jax_side["train_step"]["steps_per_call"] == 1 and jax_side["train_step"]["n"] == 3
    assert result["jax_images_per_s"] == 256 / jax_side["train_chunk"]["median_s"]
    assert result["speedup"] == result["jax_images_per_s"] / result["torch_images_per_s"]
    assert result["torch_images_per_s"] == 256 / result["torch"]["train_step"]["median_s"]
    for spread in (jax_side["train_chunk"], jax_side["train_step"], result["torch"]["train_step"]):
        assert spread["p10_s"] <= spread["median_s"] <= spread["p90_s"]
    assert isinstance(result["host_memory_kept"], bool)
    assert {"jax", "flax", "optax"} <= set(result["versions"]) and result["device"]["platform"]


def test_the_all_recipes_table_marks_nets_without_a_pytorch_class():
    ours = {"recipe": "ours_5k", "model": "ours_5k", "batch_size": 256, "jax_step_s": 0.05}
    assert format_all_row(ours, compare_torch=True) == "| `ours_5k` | ours_5k | 256 | 50.0 | — | — |"
    original = {**ours, "recipe": "final", "model": "model_8", "torch_step_s": 0.1, "speedup": 2.0}
    assert (
        format_all_row(original, compare_torch=True) == "| `final` | model_8 | 256 | 50.0 | 100.0 | 2.00x |"
    )
