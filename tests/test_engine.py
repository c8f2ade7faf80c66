"""The run's programs compile once, report progress from Python, and the library keeps its hygiene."""

import ast
import importlib.metadata
import json
import re
import sys
import tomllib
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist import onednn
from jax_mnist.bench import counting_compiles
from jax_mnist.engine import ProgramConfig, batch_metrics, make_model, programs_for
from jax_mnist.errors import ConfigError, JaxMnistError
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.run import Progress, train, train_epoch
from tests.helpers import SUBSET, small_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_later_epochs_and_a_second_engine_compile_nothing(mnist, tmp_path):
    recipe = small_recipe(epochs=3, lr=0.05)  # a configuration no other test has compiled
    seen = []
    with counting_compiles() as first_run:
        train(
            recipe,
            mnist,
            tmp_path / "a",
            seed=1,
            train_examples=SUBSET,
            log=lambda s: None,
            on_epoch_end=lambda row: seen.append(dict(first_run)),
        )
    assert seen[0]["traces"] > 0 and seen[0]["compiles"] > 0  # the counter sees compiles
    assert seen[2] == seen[0], seen  # epochs 2 and 3: no trace, no compile
    with counting_compiles() as second_run:
        train(recipe, mnist, tmp_path / "b", seed=7, train_examples=SUBSET, log=lambda s: None)
    assert second_run == {"traces": 0, "compiles": 0}
    # The programs of the same configuration are the same object: nothing is compiled twice.
    assert programs_for(ProgramConfig(recipe, SUBSET)) is programs_for(ProgramConfig(recipe, SUBSET))
    assert programs_for(ProgramConfig(recipe, SUBSET, 2)) is not programs_for(ProgramConfig(recipe, SUBSET))


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_epoch_reports_progress_between_chunks_and_runs_no_host_callback(mnist):
    n, batch = 1000, 64  # 15 full batches and one of 40
    programs = programs_for(
        ProgramConfig(with_overrides(get_recipe("model_4_batchnorm"), {"batch_size": batch}), n, 2)
    )
    train_set = programs.place_data((mnist.train_images[:n], mnist.train_labels[:n]))
    states, keys = programs.init_seeds([1, 2])
    reports = []
    states, sums = train_epoch(
        programs,
        states,
        train_set,
        keys,
        0,
        chunks=4,
        progress=lambda steps, totals: reports.append((steps, totals["count"].tolist())),
    )
    assert programs.chunks(n, 4) == [(0, 4), (4, 8), (8, 12), (12, 15)]
    assert reports == [
        (4, [256, 256]),
        (8, [512, 512]),
        (12, [768, 768]),
        (15, [960, 960]),
        (16, [1000, 1000]),
    ]
    assert sums["count"].tolist() == [n, n] and states.step.tolist() == [16, 16]
    orders = jnp.zeros((2, n), jnp.int32)
    index = jnp.asarray(0, jnp.int32)
    hlo = programs.train_chunk.lower(states, *train_set, orders, keys.step, index, index).as_text()
    assert not re.search(r"callback", hlo, re.IGNORECASE)


def test_progress_shows_the_epoch_steps_and_running_loss_on_a_terminal_only(capsys):
    bar = Progress(epochs=15, steps_per_epoch=235, enabled=True)
    bar.start_epoch(0, first_in_process=True)
    bar(100, {"loss_sum": np.array([30.0, 34.0]), "count": np.array([25_600, 25_600])})
    shown = capsys.readouterr().err
    assert "epoch 1/15" in shown and "100/235" in shown and "0.0013" in shown
    bar.status("evaluating")
    bar.close()
    assert "evaluating" in capsys.readouterr().err
    quiet = Progress(epochs=1, steps_per_epoch=1, enabled=False)
    quiet.start_epoch(0, first_in_process=True)
    quiet(1, {"loss_sum": np.zeros(1), "count": np.ones(1, int)})
    quiet.close()
    assert capsys.readouterr().err == ""


def test_off_a_terminal_progress_is_a_plain_line_at_most_every_interval(capsys):
    totals = {"loss_sum": np.array([64.0]), "count": np.array([25_600])}
    plain = Progress(epochs=15, steps_per_epoch=235, enabled=None, plain_every_s=0.0)  # stderr is captured
    plain.start_epoch(4, first_in_process=False)
    plain(100, totals)
    plain(235, totals)  # the epoch's end: the per-epoch line says it
    assert capsys.readouterr().err == "epoch 5/15: 100/235 steps, 0 s, loss 0.0025\n"
    rare = Progress(epochs=15, steps_per_epoch=235, enabled=None, plain_every_s=3600.0)
    rare.start_epoch(0, first_in_process=True)
    rare(100, totals)
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
    cpu = "onednn" if onednn.available() else "im2col"
    assert make_model(recipe, "cpu").conv_impl == cpu and make_model(recipe, "gpu").conv_impl == "xla"
    other = make_model(with_overrides(recipe, {"conv_impl": "xla", "dropout_impl": "flax"}), "cpu")
    assert (other.conv_impl, other.dropout_impl) == ("xla", "flax")
    with pytest.raises(ConfigError, match="conv_impl must be auto, im2col, onednn or xla, found 'fft'"):
        with_overrides(recipe, {"conv_impl": "fft"})
    with pytest.raises(ConfigError, match="dropout_impl must be fused or flax, found 'numpy'"):
        with_overrides(recipe, {"dropout_impl": "numpy"})


def test_cli_prints_user_errors_as_one_line_and_lets_bugs_raise(monkeypatch, capsys):
    from jax_mnist import cli
    from jax_mnist.cli import info

    def bad_input(args):
        raise ConfigError("lr must be > 0, found -1")

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "cmd_summary", bad_input)
    assert cli.main(["summary", "model_4_batchnorm"]) == 2
    assert capsys.readouterr().err == "jax-mnist summary: error: lr must be > 0, found -1\n"
    monkeypatch.setattr(info, "cmd_summary", bug)
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
    onnx_extra = {_normalized(r) for r in project["optional-dependencies"]["onnx"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO / "jax_mnist").rglob("*.py")):
        # The reference models and the PyTorch side of the benchmark need the test extra (documented).
        declared = runtime | (
            test_extra if "reference" in path.parts or path.name in ("bench.py", "torch_io.py") else set()
        )
        if path.name == "export.py":  # export --to onnx: the onnx extra, named in its one-line error
            declared |= onnx_extra
        for module in _imported_modules(path) - set(sys.stdlib_module_names) - {"jax_mnist"} - OPTIONAL:
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & declared:
                missing.setdefault(str(path.relative_to(REPO)), []).append(module)
    assert missing == {}


def test_one_version_and_the_changelog_says_what_it_changed():
    """pyproject reads the version from jax_mnist.__version__; CHANGELOG.md's newest entry is it."""
    import jax_mnist

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jax_mnist.__version__"}
    entries = re.findall(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), flags=re.M)
    assert entries and entries[0] == jax_mnist.__version__, (entries[:1], jax_mnist.__version__)
    assert importlib.metadata.version("jax-mnist") == jax_mnist.__version__  # the installed one: reinstall
    # every subpackage is shipped (a wheel holds only the packages listed)
    packages = {".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "jax_mnist").rglob("__init__.py")}
    assert set(pyproject["tool"]["setuptools"]["packages"]) == packages


def test_rate_and_time_left_count_from_after_the_compile():
    import time

    totals = {"loss_sum": np.array([1.0]), "count": np.array([256])}
    bar = Progress(epochs=15, steps_per_epoch=1000, enabled=True)
    bar.start_epoch(0, first_in_process=True)
    time.sleep(1.0)  # the first chunk: compile and 10 steps
    bar(10, totals)
    time.sleep(0.15)  # the next 10 steps, at the real pace (tqdm counts updates 0.1 s apart)
    bar(20, totals)
    rate = bar.bar.format_dict["rate"]  # steps per second shown
    bar.close()
    # 10 / 0.15 = 67 steps/s; with the compile chunk in tqdm's average it would show about 20
    assert rate > 40, rate


def _pins(path: Path) -> dict[str, str]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return dict(ln.lower().split("==", 1) for ln in lines)


def test_the_floors_are_what_ci_tests_and_the_constraints_made_the_study():
    """pyproject's floors of the core libraries are the versions of the oldest Python CI tests
    (the constraints file), and those are the versions every committed study run records."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {
        _normalized(r): r.split(">=", 1)[1] for r in project["dependencies"] if ">=" in r and "[" not in r
    }
    pins = _pins(REPO / "constraints" / "study-py3.11.txt")
    for name in ("jax", "flax", "optax", "orbax-checkpoint"):
        assert floors[name] == pins[name], f"{name}: floor {floors[name]}, constraints {pins[name]}"
    assert project["requires-python"] == ">=3.11"
    for config_path in sorted((REPO / "results" / "study").glob("*/seed-*/config.json")):
        recorded = json.loads(config_path.read_text())["versions"]
        for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
            assert recorded[name] == pins[name], f"{config_path}: {name} {recorded[name]} vs {pins[name]}"


def test_a_deprecation_from_the_projects_own_code_fails_the_test():
    """pyproject's filterwarnings: a deprecated name reached from jax_mnist or the tests is an
    error; one inside a library stays the library's warning."""
    with pytest.raises(DeprecationWarning, match="old name"):
        warnings.warn_explicit("old name", DeprecationWarning, "engine.py", 1, module="jax_mnist.engine")
    with pytest.raises(FutureWarning):
        warnings.warn_explicit("will change", FutureWarning, "report.py", 1, module="jax_mnist.report")
    with warnings.catch_warnings(record=True) as caught:  # the filters as configured, recorded
        warnings.warn_explicit("theirs", DeprecationWarning, "optax.py", 1, module="optax._src.base")
    assert [str(w.message) for w in caught] == ["theirs"]
