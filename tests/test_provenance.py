"""Which code made a run: the commit, ``dirty``, and the recipe schema version in config.json."""

import dataclasses
import json
import subprocess

import pytest

from jax_mnist.provenance import code_provenance
from jax_mnist.recipes import RECIPE_SCHEMA_VERSION, Recipe, get_recipe
from jax_mnist.rundir import RunDir, run_identity

# Recipe's fields as of RECIPE_SCHEMA_VERSION 1. A change to Recipe fails here: raise the version
# (runs record it) and update this list together.
SCHEMA_1_FIELDS = (
    "name model epochs batch_size eval_batch_size validation lr momentum nesterov weight_decay "
    "schedule step_size gamma pct_start div_factor final_div_factor three_phase anneal "
    "cycle_momentum base_momentum max_momentum augment degrees translate scale_min scale_max "
    "augment_off_epochs dropout_rate label_smoothing ema teacher distill_weight "
    "distill_temperature conv_impl dropout_impl seed_axis"
).split()


def test_the_recipe_schema_version_names_the_current_fields():
    assert RECIPE_SCHEMA_VERSION == 1
    assert [f.name for f in dataclasses.fields(Recipe)] == SCHEMA_1_FIELDS


def git(root, *args):
    done = subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A git checkout holding a package and its pyproject, committed."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.py").write_text("WIDTH = 8\n")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'pkg'\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return tmp_path


def test_a_clean_checkout_records_its_commit(checkout):
    found = code_provenance(checkout / "pkg")
    assert found == {"commit": git(checkout, "rev-parse", "HEAD"), "dirty": False, "recipe_schema": 1}


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "pkg" / "model.py").write_text("WIDTH = 16\n"),  # an edited module
        lambda root: (root / "pkg" / "new.py").write_text("X = 1\n"),  # a module not committed yet
        lambda root: (root / "pyproject.toml").write_text("[project]\nname = 'other'\n"),
    ],
)
def test_changed_code_is_dirty(checkout, change):
    change(checkout)
    assert code_provenance(checkout / "pkg")["dirty"] is True


def test_results_and_docs_beside_the_code_do_not_make_it_dirty(checkout):
    (checkout / "results").mkdir()
    (checkout / "results" / "metrics.jsonl").write_text("{}\n")
    (checkout / "README.md").write_text("notes\n")
    assert code_provenance(checkout / "pkg")["dirty"] is False


def test_a_package_outside_a_checkout_records_no_commit(tmp_path):
    (tmp_path / "pkg").mkdir()
    assert code_provenance(tmp_path / "pkg") == {"commit": None, "dirty": None, "recipe_schema": 1}


def test_a_package_nested_inside_another_repository_is_not_credited_to_it(checkout):
    """An install under some other repository's tree (a venv inside a project) has no commit of ours."""
    inner = checkout / "venv" / "site-packages" / "pkg"
    inner.mkdir(parents=True)
    assert code_provenance(inner)["commit"] is None


@pytest.mark.parametrize(("validation", "split"), [(0, "test"), (10_000, "validation")])
def test_a_new_run_directory_records_its_code_and_what_best_means(tmp_path, validation, split):
    recipe = dataclasses.replace(get_recipe("ours_5k"), validation=validation)
    identity = run_identity(recipe, 1, 60_000 - validation)
    with RunDir.open(1, tmp_path / "run", identity, None, None, lambda line: None):
        pass
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["code"] == code_provenance()
    assert config["best_checkpoint"] == f"best/ holds the epoch of best {split} accuracy"
