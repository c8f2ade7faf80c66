"""The engine compiles each program once, reports progress from Python, and keeps library hygiene."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist.bench import counting_compiles
from jax_mnist.engine import Engine, batch_metrics
from jax_mnist.errors import ConfigError, JaxMnistError
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.run import _Progress, train

from tests.helpers import SUBSET, small_recipe

REPO = Path(__file__).resolve().parents[1]


def test_later_epochs_and_a_second_engine_compile_nothing(mnist, tmp_path):
    recipe = small_recipe(epochs=3, lr=0.05)  # a configuration no other test has compiled
    seen = []
    with counting_compiles() as first_run:
        train(recipe, mnist, tmp_path / "a", seed=1, train_examples=SUBSET, log=lambda s: None,
              on_epoch_end=lambda row: seen.append(dict(first_run)))  # fmt: skip
    assert seen[0]["traces"] > 0 and seen[0]["compiles"] > 0  # the counter sees compiles
    assert seen[2] == seen[0], seen  # epochs 2 and 3: no trace, no compile
    with counting_compiles() as second_run:
        train(recipe, mnist, tmp_path / "b", seed=7, train_examples=SUBSET, log=lambda s: None)
    assert second_run == {"traces": 0, "compiles": 0}
    # A second engine for the same configuration is the first one, programs and all.
    assert Engine.from_recipe(recipe, SUBSET) is Engine.from_recipe(recipe, SUBSET)


def test_epoch_reports_progress_between_chunks_and_runs_no_host_callback(mnist):
    n, batch = 1000, 64  # 15 full batches and one of 40
    engine = Engine.from_recipe(with_overrides(get_recipe("model_4_batchnorm"), {"batch_size": batch}), n)
    train_set = engine.put_shared((mnist.train_images[:n], mnist.train_labels[:n]))
    states, keys = engine.init_seeds([1, 2])
    reports = []
    states, sums = engine.train_epoch(states, *train_set, keys, 0, chunks=4,
                                      progress=lambda steps, totals: reports.append((steps, totals["count"].tolist())))  # fmt: skip
    assert engine.epoch_chunks(n, 4) == [(0, 4), (4, 8), (8, 12), (12, 15)]
    assert reports == [(4, [256, 256]), (8, [512, 512]), (12, [768, 768]), (15, [960, 960]), (16, [1000, 1000])]
    assert sums["count"].tolist() == [n, n] and states.step.tolist() == [16, 16]
    orders = jnp.zeros((2, n), jnp.int32)
    index = jnp.asarray(0, jnp.int32)
    hlo = engine._programs["steps"].lower(states, *train_set, orders, keys.step, index, index).as_text()
    assert not re.search(r"callback", hlo, re.IGNORECASE)


def test_progress_line_shows_rate_time_left_and_loss(capsys):
    bar = _Progress(epochs=15, steps_per_epoch=235, images_per_step=512, enabled=True)
    bar.start_epoch(0, first_in_process=True)
    assert "epoch 1/15: compiling the training step" in capsys.readouterr().err
    bar(100, {"loss_sum": np.array([30.0, 34.0]), "count": np.array([25_600, 25_600])})
    line = capsys.readouterr().err
    assert "100/235 steps" in line and "images/s" in line and "s left" in line and "loss 0.0013" in line
    bar.status("evaluating")
    assert "epoch 1/15: evaluating" in capsys.readouterr().err
    quiet = _Progress(epochs=1, steps_per_epoch=1, images_per_step=1, enabled=False)
    quiet.start_epoch(0, first_in_process=True)
    quiet(1, {"loss_sum": np.zeros(1), "count": np.ones(1, int)})
    assert capsys.readouterr().err == ""


def test_batch_metrics_leave_padding_out():
    logp = jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]))
    labels = jnp.array([0, 0, 1])
    metrics = batch_metrics(logp, labels, jnp.array([True, True, False]))
    assert int(metrics["count"]) == 2 and int(metrics["correct"]) == 1
    assert float(metrics["loss_sum"]) == pytest.approx(-np.log(0.9) - np.log(0.2), rel=1e-6)
    assert int(batch_metrics(logp, labels)["count"]) == 3


def test_implementation_choices_are_recipe_fields():
    recipe = get_recipe("final")
    assert (recipe.conv_impl, recipe.dropout_impl) == ("auto", "fused")
    engine = Engine.from_recipe(recipe, 60_000)
    assert engine.model.conv_impl == ("im2col" if jax.devices()[0].platform == "cpu" else "xla")
    other = Engine.from_recipe(with_overrides(recipe, {"conv_impl": "xla", "dropout_impl": "flax"}), 60_000)
    assert (other.model.conv_impl, other.model.dropout_impl) == ("xla", "flax")
    with pytest.raises(ConfigError, match="conv_impl must be auto, im2col or xla, found 'fft'"):
        with_overrides(recipe, {"conv_impl": "fft"})
    with pytest.raises(ConfigError, match="dropout_impl must be fused or flax, found 'numpy'"):
        with_overrides(recipe, {"dropout_impl": "numpy"})


def test_cli_prints_user_errors_as_one_line_and_lets_bugs_raise(monkeypatch, capsys):
    from jax_mnist import cli

    def bad_input(args):
        raise ConfigError("lr must be > 0, found -1")

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_summary", bad_input)
    assert cli.main(["summary", "model_4_batchnorm"]) == 2
    assert capsys.readouterr().err == "jax-mnist summary: error: lr must be > 0, found -1\n"
    monkeypatch.setattr(cli, "cmd_summary", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["summary", "model_4_batchnorm"])
    assert issubclass(cli.UserError, JaxMnistError)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _normalized(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# Imported only to say what is missing: a tfds dataset prepared in tfrecord format needs TensorFlow,
# and jax_mnist.data's error tells the user so (data.py) instead of requiring it.
OPTIONAL = {"tensorflow"}


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_normalized(r) for r in project["dependencies"]}
    test_extra = {_normalized(r) for r in project["optional-dependencies"]["test"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO / "jax_mnist").rglob("*.py")):
        # The reference models and the PyTorch side of the benchmark need the test extra (documented).
        declared = runtime | (test_extra if "reference" in path.parts or path.name in ("bench.py", "torch_io.py") else set())
        for module in _imported_modules(path) - set(sys.stdlib_module_names) - {"jax_mnist"} - OPTIONAL:
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & declared:
                missing.setdefault(str(path.relative_to(REPO)), []).append(module)
    assert missing == {}
