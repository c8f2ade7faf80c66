import functools
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist import engine
from jax_mnist.engine import CPU_COMPILER_OPTIONS, ProgramConfig, compiler_options, programs_for
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.run import NonFiniteLoss, RunError, train
from jax_mnist.rundir import read_metrics
from tests.helpers import (
    EPOCH_KEYS,
    SMALL,
    SUBSET,
    final_params,
    jax_mnist_command,
    kill_then_resume,
    numbers,
    small_recipe,
)


def test_metrics_file_and_config(straight_run):
    out, history = straight_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == history and [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(list(r) == EPOCH_KEYS for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.01], rel=1e-6)  # StepLR(step 2, gamma 0.1)
    assert all(0 <= r["test_accuracy"] <= 100 and 0 <= r["train_accuracy"] <= 100 for r in rows)
    assert rows[-1]["test_accuracy"] > 50  # it learns, even from 1,000 images
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["name"] == "final" and config["recipe"]["epochs"] == 3
    assert config["seed"] == 1 and config["train_examples"] == SUBSET
    assert {"jax", "flax", "optax"} <= set(config["versions"]) and config["device"]["platform"]


def test_same_seed_same_metrics_other_seed_differs(straight_run, mnist, tmp_path):
    _, history = straight_run
    recipe = with_overrides(small_recipe(), {"epochs": 1})
    again = train(recipe, mnist, tmp_path / "again", seed=1, train_examples=SUBSET, log=lambda s: None)
    other = train(recipe, mnist, tmp_path / "other", seed=2, train_examples=SUBSET, log=lambda s: None)
    # The first epoch of a 1-epoch and a 3-epoch StepLR run are the same computation.
    assert numbers(again) == numbers(history[:1])
    assert numbers(other) != numbers(history[:1])


def test_interrupted_then_resumed_equals_straight(straight_run, mnist, tmp_path):
    out_straight, history = straight_run
    out = tmp_path / "interrupted"

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            small_recipe(),
            mnist,
            out,
            seed=1,
            train_examples=SUBSET,
            log=lambda s: None,
            on_epoch_end=stop_after_two,
        )
    resumed = train(
        small_recipe(), mnist, out, seed=1, train_examples=SUBSET, resume=True, log=lambda s: None
    )
    assert numbers(resumed) == numbers(history)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(out), final_params(out_straight))


@pytest.mark.slow  # spawns processes
def test_sigkill_mid_epoch_then_resume_equals_straight(straight_run, mnist_data_dir, tmp_path):
    out_straight, history = straight_run
    out = tmp_path / "killed"
    # Killed as soon as epoch 1 is reported (its checkpoint is complete then): epoch 2 is under way.
    done = kill_then_resume(["--seed", "1"], out, mnist_data_dir, kill_at="epoch  1/3")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert "resumed from the checkpoint of epoch" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert numbers(rows) == numbers(history)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(out), final_params(out_straight))


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_a_few_steps_reduce_the_loss(mnist):
    recipe = with_overrides(get_recipe("model_4_batchnorm"), {"batch_size": 64})
    model, tx = engine.make_model(recipe, "cpu"), engine.make_optimizer(recipe, 1)
    step = jax.jit(functools.partial(engine.train_step, model, tx, engine.make_augment(recipe)))
    state = engine.init_state(model, tx, jax.random.key(0))
    images, labels = jnp.asarray(mnist.train_images[:64]), jnp.asarray(mnist.train_labels[:64])
    losses = []
    for index in range(8):
        state, metrics = step(state, images, labels, jax.random.key(index))
        losses.append(float(metrics["loss_sum"]) / 64)
    assert losses[-1] < 0.8 * losses[0]
    assert int(state.step) == 8


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_evaluation_counts_every_test_image(mnist):
    """Batch sizes that do not divide 10,000 still score every image, with the same loss and accuracy."""
    model = engine.make_model(get_recipe("model_4_batchnorm"), "cpu")
    variables = engine.init_variables(model, jax.random.key(0))
    logp = model.apply(
        variables, engine.normalize(engine.preprocess(jnp.asarray(mnist.test_images))), train=False
    )
    expected_accuracy = 100.0 * float(jnp.mean(jnp.argmax(logp, -1) == mnist.test_labels))
    expected_loss = float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(mnist.test_labels)[:, None], -1)))
    for eval_batch_size in (3000, 4096):
        sums = jax.jit(functools.partial(engine.eval_sums, model, batch_size=eval_batch_size))(
            variables["params"], variables["batch_stats"], mnist.test_images, mnist.test_labels
        )
        result = engine.means(jax.device_get(sums))
        assert result["count"] == 10_000
        assert result["accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_epoch_uses_every_example_once_with_a_short_last_batch(mnist):
    n, batch = 300, 128  # 2 full batches and one of 44
    from jax_mnist.run import train_epoch

    programs = programs_for(
        ProgramConfig(with_overrides(get_recipe("model_4_batchnorm"), {"batch_size": batch}), n)
    )
    states, keys = programs.init_seeds([1])
    states, sums = train_epoch(
        programs, states, programs.place_data((mnist.train_images[:n], mnist.train_labels[:n])), keys, 0
    )
    assert sums["count"].tolist() == [n] and states.step.tolist() == [3]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_non_finite_loss_stops_the_run(mnist, tmp_path):
    recipe = with_overrides(get_recipe("model_3_lighter_model"), {"epochs": 2, "batch_size": 100, "lr": 1e8})
    with pytest.raises(
        NonFiniteLoss, match=r"epoch 1: training loss is nan; run stopped. No checkpoint was written yet"
    ):
        train(recipe, mnist, tmp_path / "nan", train_examples=500, log=lambda s: None)
    assert read_metrics(tmp_path / "nan" / "metrics.jsonl") == []  # nothing recorded for the bad epoch


def test_foreign_or_existing_run_directory_is_refused(straight_run, mnist, tmp_path):
    out, _ = straight_run
    before = (out / "metrics.jsonl").read_text()
    other = with_overrides(get_recipe("final_onecycle"), SMALL)
    with pytest.raises(RunError, match="holds a different run .*'final'"):
        train(other, mnist, out, seed=1, train_examples=SUBSET)
    with pytest.raises(RunError, match="already holds this run; pass --resume"):
        train(small_recipe(), mnist, out, seed=1, train_examples=SUBSET)
    assert (out / "metrics.jsonl").read_text() == before


def test_bad_arguments(mnist, tmp_path):
    with pytest.raises(ValueError, match="epochs must be >= 1, found 0"):
        with_overrides(get_recipe("final"), {"epochs": "0"})
    with pytest.raises(ValueError, match="batch_size must be >= 1, found 0"):
        with_overrides(get_recipe("final"), {"batch_size": 0})
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['colour'\]"):
        with_overrides(get_recipe("final"), {"colour": "red"})
    with pytest.raises(ValueError, match="lr takes a float, found 'fast'"):
        with_overrides(get_recipe("final"), {"lr": "fast"})
    with pytest.raises(RunError, match="batch size 512 is larger than the 100 training examples"):
        train(
            with_overrides(get_recipe("final"), {"batch_size": 512}),
            mnist,
            tmp_path / "x",
            train_examples=100,
        )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--recipe", "nope"], "invalid choice: 'nope'"),
        (["--recipe", "final", "--epochs", "0"], "epochs must be >= 1, found 0"),
        (["--recipe", "final", "--batch-size", "0"], "batch_size must be >= 1, found 0"),
        (
            ["--recipe", "final", "--batch-size", "70000"],
            "batch size 70000 is larger than the 60000 training examples",
        ),
        (["--recipe", "final", "--set", "warp=9"], "unknown recipe field(s) ['warp']"),
        (["--recipe", "final", "--set", "lr"], "--set takes FIELD=VALUE, found 'lr'"),
    ],
)
@pytest.mark.slow  # spawns processes
def test_cli_errors_are_one_line(args, message, mnist_data_dir, tmp_path):
    proc = subprocess.run(
        jax_mnist_command(["train", *args, "--no-download"], out=tmp_path / "o", data_dir=mnist_data_dir),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # spawns processes
def test_cli_smoke_run(mnist_data_dir, tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run(
        jax_mnist_command(
            "train --recipe model_6_gap --epochs 1 --train-examples 512 --batch-size 128 --no-download",
            out=out,
            data_dir=mnist_data_dir,
        ),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch  1/1" in proc.stdout
    row = json.loads((out / "metrics.jsonl").read_text())
    assert list(row) == EPOCH_KEYS and row["lr"] == 0.01
    assert (out / "checkpoints" / "1").is_dir()


def test_compiler_options_apply_on_cpu_only_and_only_those_xla_takes():
    from collections import namedtuple

    device = jax.devices()[0]
    chosen = compiler_options(device)
    # The CPU option where this XLA takes it (jax 0.12's no longer does): either way the step compiles.
    assert chosen in ({}, dict(CPU_COMPILER_OPTIONS)) if device.platform == "cpu" else chosen == {}
    step = jax.jit(lambda x: x * 2 + 1, compiler_options=chosen)
    assert float(step(jnp.ones(()))) == 3.0
    # An option XLA refuses is dropped, not passed on to fail the compile.
    assert compiler_options(device, (("xla_no_such_option_anywhere", True),)) == {}
    assert compiler_options(namedtuple("Device", "platform")("gpu")) == {}
