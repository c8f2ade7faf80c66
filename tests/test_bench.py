import json

import pytest

from jax_mnist.cli import main


@pytest.mark.slow  # spawns processes
def test_bench_writes_json_with_speedup_keys(tmp_path):
    path = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--recipe",
                "model_4_batchnorm",
                "--batch-size",
                "32",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--no-epoch",
                "--compare-torch",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    result = json.loads(path.read_text())
    for key in ("jax_images_per_s", "torch_images_per_s", "speedup"):
        assert result[key] > 0
    assert abs(result["speedup"] - result["jax_images_per_s"] / result["torch_images_per_s"]) < 1e-9
    assert result["jax"]["cold_compile_s"] > 0 and result["jax"]["warm_compile_s"] > 0
    assert result["jax"]["train_step"]["n"] == 3
    assert result["jax"]["train_step"]["page_faults_per_step"] >= 0
    assert result["torch"]["train_step"]["page_faults_per_step"] >= 0
    assert isinstance(result["host_memory_kept"], bool)
    assert {"jax", "flax", "optax"} <= set(result["versions"]) and result["device"]["platform"]
