"""`jax-mnist export RUN --to onnx` (issue 36): the run's inference function in onnxruntime, with
no JAX in the loop, scores the test set as the run itself does."""

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
import onnx
import onnxruntime
import pytest

from jax_mnist.cli import main
from jax_mnist.engine import TrainState
from jax_mnist.export import inference_function, load_stablehlo, onnx_model
from jax_mnist.inference import read_predictions
from jax_mnist.recipes import get_recipe
from jax_mnist.rundir import Run
from jax_mnist.zoo import MODEL_NAMES, get_model, init_variables

pytestmark = pytest.mark.slow  # converts networks (seconds each) and scores the test set


def session(model_bytes: bytes) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def test_the_onnx_file_of_a_trained_run_scores_the_test_set_as_evaluate_does(
    straight_run, mnist, mnist_data_dir, tmp_path, capsys
):
    run_dir, path = straight_run[0], tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--to", "onnx", str(path)]) == 0
    assert "ONNX (opset 23)" in capsys.readouterr().out
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    (images,) = model.graph.input
    assert images.name == "images" and images.type.tensor_type.shape.dim[0].dim_param == "batch"
    data = ["--data-dir", str(mnist_data_dir), "--no-download"]
    assert main(["evaluate", str(run_dir), "--out", str(tmp_path / "evaluation"), *data]) == 0
    predicted_by_evaluate = read_predictions(tmp_path / "evaluation.npz").predicted
    stablehlo = tmp_path / "model.stablehlo"
    assert main(["export", str(run_dir), "--to", "stablehlo", str(stablehlo)]) == 0
    test_images = np.asarray(mnist.test_images)
    onnx_log_probabilities = np.concatenate(
        [
            session(path.read_bytes()).run(None, {"images": test_images[i : i + 1000]})[0]
            for i in range(0, 10_000, 1000)
        ]
    )
    assert (onnx_log_probabilities.argmax(1) == predicted_by_evaluate).sum() == 10_000
    stablehlo_log_probabilities = np.asarray(load_stablehlo(stablehlo).call(test_images[:1000]))
    np.testing.assert_allclose(onnx_log_probabilities[:1000], stablehlo_log_probabilities, atol=1e-4)
    assert session(path.read_bytes()).run(None, {"images": test_images[:1]})[0].shape == (1, 10)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_network_of_the_zoo_converts_and_computes_the_same_function(model_name, test_images_raw):
    recipe = dataclasses.replace(get_recipe("final"), name=model_name, model=model_name)
    # Random weights in the shapes the network has (its init, op by op or compiled, takes ~30 s for
    # some), scaled as He's init scales them (activations stay of order one through the layers);
    # running variances positive, as BatchNorm's are.
    shapes = jax.eval_shape(lambda: init_variables(get_model(model_name), jax.random.key(1)))
    rng = np.random.default_rng(1)

    def random(path, leaf):
        if "var" in jax.tree_util.keystr(path):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 100
        return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(random, shapes)
    state = TrainState(
        step=0, params=variables["params"], batch_stats=variables["batch_stats"], opt_state=None
    )
    config = {"recipe": dataclasses.asdict(recipe), "seed": 1, "train_examples": 60_000}
    run = Run(Path("untrained"), config, [], epoch=0, state=state)
    images = test_images_raw[:64]
    got = session(onnx_model(run).SerializeToString()).run(None, {"images": images})[0]
    np.testing.assert_allclose(got, np.asarray(inference_function(run)(images)), atol=1e-4)


def test_without_the_extra_the_command_says_what_to_install(straight_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed: importing it fails
    out = tmp_path / "model.onnx"
    assert main(["export", str(straight_run[0]), "--to", "onnx", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'jax-mnist[onnx]'" in err[0] and not out.exists()
