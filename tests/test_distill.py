"""Knowledge distillation (issue 21): the softened KL term, its place in the training step, and a
teacher run named by a recipe: verified, stated in the student's config, refused when it could
leak the student's validation split."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist.cli import main
from jax_mnist.distill import Teacher, distillation_loss, weights_digest
from jax_mnist.engine import (
    ProgramConfig,
    init_state,
    make_augment,
    make_model,
    make_optimizer,
    programs_for,
    train_step,
)
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.rundir import load_run, read_run


def test_the_distillation_term_is_the_softened_kl_times_t_squared():
    rng = np.random.default_rng(0)
    student = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 10)), jnp.float32))
    teacher = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 10)) * 3, jnp.float32))
    t = 4.0
    p = np.exp(np.asarray(teacher) / t) / np.exp(np.asarray(teacher) / t).sum(1, keepdims=True)
    q = np.exp(np.asarray(student) / t) / np.exp(np.asarray(student) / t).sum(1, keepdims=True)
    expected = t**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
    assert float(distillation_loss(student, teacher, t)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)
    # Log-probabilities or logits: a shift per example changes nothing.
    assert float(distillation_loss(student + 5.0, teacher - 2.0, t)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(student, teacher, 1.0)) != pytest.approx(expected, rel=1e-2)


def test_the_teacher_digest_changes_with_its_weights():
    weights = {"params": {"w": np.ones(3, np.float32)}}
    other = {"params": {"w": np.array([1, 1, 2], np.float32)}}
    assert weights_digest(weights) == weights_digest({"params": {"w": np.ones(3, np.float32)}})
    assert weights_digest(weights) != weights_digest(other)


def test_the_programs_take_the_teacher_loaded_and_equal_teachers_share_them():
    """The engine reads no file: a recipe naming a teacher needs it loaded (rundir.load_teacher),
    and a teacher given to a recipe without one is refused; equal teachers share the programs."""
    plain = get_recipe("ours_2k")
    taught = with_overrides(plain, {"teacher": "runs/teacher"})
    model = make_model(plain, "cpu")
    variables = {"params": {}, "batch_stats": {}}
    record = {"run": "runs/teacher", "epoch": 3, "weights_sha256": "ab"}
    with pytest.raises(ValueError, match="names teacher 'runs/teacher' but the programs were given none"):
        programs_for(ProgramConfig(taught, 512))
    with pytest.raises(ValueError, match="names teacher '' but the programs were given one"):
        programs_for(ProgramConfig(plain, 512), Teacher(model, variables, record))
    first = programs_for(ProgramConfig(taught, 512), Teacher(model, variables, record))
    assert programs_for(ProgramConfig(taught, 512), Teacher(model, dict(variables), dict(record))) is first
    other = Teacher(model, variables, {**record, "weights_sha256": "cd"})
    assert programs_for(ProgramConfig(taught, 512), other) is not first


@pytest.mark.slow  # compiles three training steps
def test_with_full_weight_the_step_follows_the_teacher_not_the_labels():
    recipe = with_overrides(get_recipe("ours_2k"), {"augment": "none"})
    model, tx = make_model(recipe, "cpu"), make_optimizer(recipe, 10)
    state = init_state(model, tx, jax.random.key(1))
    teacher_state = init_state(model, tx, jax.random.key(2))
    teacher = Teacher(model, {"params": teacher_state.params, "batch_stats": teacher_state.batch_stats}, {})
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1)), jnp.uint8)
    labels = jnp.arange(32, dtype=jnp.int32) % 10
    other_labels = (labels + 3) % 10
    stream = jax.random.key(5)

    def params_after(step, labels):
        new_state, _ = jax.jit(step)(state, images, labels, stream)
        return jax.tree_util.tree_map(np.asarray, new_state.params)

    base = functools.partial(train_step, model, tx, make_augment(recipe))
    taught = functools.partial(base, teacher=teacher, distill_weight=1.0)
    same = jax.tree_util.tree_map(
        np.array_equal, params_after(taught, labels), params_after(taught, other_labels)
    )
    assert all(jax.tree_util.tree_leaves(same))
    # Weight 0: the plain step, whatever the teacher says.
    untaught = functools.partial(base, teacher=teacher, distill_weight=0.0)
    plain = jax.tree_util.tree_map(np.allclose, params_after(untaught, labels), params_after(base, labels))
    assert all(jax.tree_util.tree_leaves(plain))
    moved = jax.tree_util.tree_map(np.array_equal, params_after(taught, labels), params_after(base, labels))
    assert not all(jax.tree_util.tree_leaves(moved))


@pytest.mark.slow  # trains two short runs through the command line
def test_a_teacher_run_is_verified_stated_and_kept_to_its_validation_split(tmp_path, mnist_data_dir, capsys):
    small = [
        "--train-examples",
        "256",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--data-dir",
        str(mnist_data_dir),
    ]
    teacher_dir = tmp_path / "teacher"
    assert (
        main(["train", "--recipe", "ours_2k", "--validation", "500", "--out", str(teacher_dir), *small]) == 0
    )
    student_dir = tmp_path / "student"
    student = ["train", "--recipe", "ours_2k", "--validation", "500", "--set", f"teacher={teacher_dir}"]
    assert main([*student, "--set", "distill_weight=0.7", "--out", str(student_dir), *small]) == 0
    config = json.loads((student_dir / "config.json").read_text())
    assert config["recipe"]["teacher"] == str(teacher_dir) and config["recipe"]["distill_weight"] == 0.7
    taught_by = config["teacher"]
    assert taught_by["recipe"] == "ours_2k" and taught_by["epoch"] == 1 and taught_by["validation"] == 500
    assert taught_by["weights_sha256"] == weights_digest(load_run(teacher_dir).variables)
    assert "val_accuracy" in read_run(student_dir).history[0]
    capsys.readouterr()
    # A teacher that trained on this run's validation examples would leak them: refused in one line.
    leaky = ["train", "--recipe", "ours_2k", "--validation", "1000", "--set", f"teacher={teacher_dir}"]
    assert main([*leaky, "--out", str(tmp_path / "leaky"), *small]) == 2
    err = capsys.readouterr().err
    assert "held out 500 of the training examples" in err and "--validation 1000" in err
    assert len([line for line in err.splitlines() if not line.startswith("[jax_mnist.data]")]) == 1
    missing = ["train", "--recipe", "ours_2k", "--set", f"teacher={tmp_path / 'nothing'}"]
    assert main([*missing, "--out", str(tmp_path / "orphan"), *small]) == 2
    assert "no such directory" in capsys.readouterr().err
