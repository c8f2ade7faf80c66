"""Several seeds in one compiled program: each seed computes what its single-seed run computes,
writes what a single-seed run writes, and resumes exactly after kill -9."""

import json
import re

import jax
import numpy as np
import pytest

from jax_mnist.cli import parse_seeds
from jax_mnist.errors import JaxMnistError
from jax_mnist.run import seed_dirs, train, train_seeds
from tests.helpers import SUBSET, final_params, kill_then_resume, numbers, small_recipe

SEEDS = (1, 2)


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("multi")
    histories = train_seeds(
        small_recipe(), mnist, seed_dirs(out, SEEDS), train_examples=SUBSET, log=lambda s: None
    )
    return out, histories


@pytest.fixture(scope="module")
def single_runs(straight_run, tmp_path_factory, mnist):
    """Seed 1 is test_train's straight run; seed 2 is trained here on its own."""
    out = tmp_path_factory.mktemp("seed2")
    history = train(small_recipe(), mnist, out, seed=2, train_examples=SUBSET, log=lambda s: None)
    return {1: straight_run, 2: (out, history)}


def assert_same_function(alone: list[dict], together: list[dict]) -> None:
    assert [r["epoch"] for r in together] == [r["epoch"] for r in alone]
    for a, t in zip(alone, together):
        assert t["lr"] == a["lr"]
        assert abs(t["test_accuracy"] - a["test_accuracy"]) <= 0.05
        assert abs(t["train_accuracy"] - a["train_accuracy"]) <= 0.2  # 1,000 examples: 2 of them
        assert t["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
        assert t["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_each_seed_computes_its_single_seed_run(multi_run, single_runs):
    """The default seed axis: lax.map on CPU, where each seed runs the single-seed step itself."""
    _, histories = multi_run
    for seed in SEEDS:
        assert_same_function(single_runs[seed][1], histories[seed])
        if jax.devices()[0].platform == "cpu":  # measured bitwise there (README, 'Several seeds at once')
            # ... on jax 0.10.2; jax 0.12.1 sums the losses in another order (1e-7 apart), so the
            # losses are held to 1e-6 relative and every other number to the bit.
            for m, a in zip(numbers(histories[seed]), numbers(single_runs[seed][1])):
                for key in ("train_loss", "test_loss"):
                    assert m.pop(key) == pytest.approx(a.pop(key), rel=1e-6)
                assert m == a
    assert numbers(histories[1]) != numbers(histories[2])  # and the seeds differ from each other


def programs(recipe, seeds):
    from jax_mnist.engine import ProgramConfig, programs_for

    return programs_for(ProgramConfig(recipe, SUBSET, seeds))


def epoch_metrics(recipe, train_set, test_set, seeds, epochs=2):
    from jax_mnist.run import evaluate_seeds, train_epoch

    compiled = programs(recipe, len(seeds))
    states, keys = compiled.init_seeds(seeds)
    rows = []
    for epoch in range(epochs):
        states, sums = train_epoch(compiled, states, train_set, keys, epoch)
        tests = evaluate_seeds(compiled, states, test_set)
        rows.append(
            [
                {
                    "epoch": epoch + 1,
                    "lr": 0.1,
                    "train_loss": float(sums["loss_sum"][k] / sums["count"][k]),
                    "train_accuracy": 100.0 * int(sums["correct"][k]) / int(sums["count"][k]),
                    "test_loss": tests[k]["loss"],
                    "test_accuracy": tests[k]["accuracy"],
                }
                for k in range(len(seeds))
            ]
        )
    return [[row[k] for row in rows] for k in range(len(seeds))]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_vmapped_seeds_compute_their_single_seed_runs(mnist):
    """vmap (the default on GPU/TPU) computes the same function with sums grouped differently.

    One step of the full recipe agrees to float rounding. Over many steps at lr 0.1 such
    last-bit differences grow about tenfold per step once dropout or rotation is on (measured,
    README "Several seeds at once"), so the two-epoch comparison runs without them.
    """
    import jax.numpy as jnp

    # im2col convolutions: vmap's regrouping is what is measured here. With oneDNN's kernels (each
    # seed's convolutions bitwise its own, tests/test_onednn.py) the other layers' regrouped sums
    # grew to 2.0e-4 in the losses and 0.31 points of test accuracy over the two epochs below.
    recipe = small_recipe(seed_axis="vmap", conv_impl="im2col")
    train_set = programs(recipe, 1).place_data((mnist.train_images[:SUBSET], mnist.train_labels[:SUBSET]))
    first, last = jnp.asarray(0, jnp.int32), jnp.asarray(1, jnp.int32)  # one step (see the docstring)
    results = {}
    for seeds in ([1, 2], [1], [2]):
        compiled = programs(recipe, len(seeds))
        states, keys = compiled.init_seeds(seeds)
        orders = compiled.shuffle(keys.shuffle, jnp.asarray(0, jnp.int32))
        results[tuple(seeds)] = compiled.train_chunk(states, *train_set, orders, keys.step, first, last)
    (together, together_sums) = results[(1, 2)]
    for index, seed in enumerate(SEEDS):
        alone, alone_sums = results[(seed,)]
        np.testing.assert_allclose(together_sums["loss_sum"][index], alone_sums["loss_sum"][0], rtol=1e-6)
        for a, t in zip(jax.tree_util.tree_leaves(alone.params), jax.tree_util.tree_leaves(together.params)):
            np.testing.assert_allclose(np.asarray(t[index]), np.asarray(a[0]), rtol=1e-5, atol=1e-6)

    plain = small_recipe(seed_axis="vmap", augment="none", dropout_rate=0.0, epochs=2, conv_impl="im2col")
    test_set = programs(plain, 1).place_data((mnist.test_images, mnist.test_labels))
    together = epoch_metrics(plain, train_set, test_set, list(SEEDS))
    for index, seed in enumerate(SEEDS):
        (alone,) = epoch_metrics(plain, train_set, test_set, [seed])
        assert_same_function(alone, together[index])


def test_each_seed_directory_is_what_a_single_run_writes(multi_run, single_runs):
    out, histories = multi_run
    for seed in SEEDS:
        run_dir, alone_dir = out / f"seed-{seed}", single_runs[seed][0]
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in alone_dir.iterdir())
        config, alone_config = (json.loads((d / "config.json").read_text()) for d in (run_dir, alone_dir))
        assert (
            config == alone_config
        )  # same identity, versions, device: interchangeable for resume and reports
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows == histories[seed]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3"]
    # a seed of the multi-seed run resumes as a single-seed run: nothing left to do, history kept
    again = train(
        small_recipe(),
        unused_data(),
        out / "seed-2",
        seed=2,
        train_examples=SUBSET,
        resume=True,
        log=lambda s: None,
    )
    assert again == histories[2]


def unused_data():
    """Data that is never read: a finished run trains nothing (only sizes are checked)."""
    from jax_mnist.data import Mnist

    images, labels = np.zeros((SUBSET, 28, 28, 1), np.uint8), np.zeros((SUBSET,), np.int32)
    return Mnist(images, labels, images[:10], labels[:10])


@pytest.mark.slow  # spawns processes
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(multi_run, mnist_data_dir, tmp_path):
    out_straight, histories = multi_run
    out = tmp_path / "killed"
    # Both seeds' epoch 1 is checkpointed once seed 2's line is out: the kill lands in epoch 2.
    done = kill_then_resume(["--seeds", "1-2"], out, mnist_data_dir, kill_at="epoch  1/3 seed 2")
    assert "seed 1: resumed from the checkpoint of epoch" in done.stdout
    for seed in SEEDS:
        rows = [
            json.loads(line) for line in (out / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert numbers(rows) == numbers(histories[seed])  # bitwise: the same program over the same seeds
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            final_params(out / f"seed-{seed}"),
            final_params(out_straight / f"seed-{seed}"),
        )


def test_resume_skips_finished_seeds_and_groups_the_rest(multi_run, mnist, tmp_path):
    """Seed 2 finished, seed 3 new: only seed 3 trains, from scratch; seed 2 keeps its files."""
    out_straight, histories = multi_run
    out = tmp_path / "mixed"
    import shutil

    shutil.copytree(out_straight / "seed-2", out / "seed-2")
    before = (out / "seed-2" / "metrics.jsonl").read_text()
    logged = []
    result = train_seeds(
        small_recipe(), mnist, seed_dirs(out, (2, 3)), train_examples=SUBSET, resume=True, log=logged.append
    )
    assert any(line.startswith("seed 2: all 3 epochs are done") for line in logged)
    assert (out / "seed-2" / "metrics.jsonl").read_text() == before
    assert result[2] == histories[2] and [r["epoch"] for r in result[3]] == [1, 2, 3]


@pytest.mark.parametrize(
    "text,seeds", [("1-5", [1, 2, 3, 4, 5]), ("1,3,7", [1, 3, 7]), ("1-3,7", [1, 2, 3, 7]), ("4", [4])]
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    "text,message",
    [
        ("1-x", "--seeds takes seeds like 1-5 or 1,3,7, found '1-x'"),
        ("1-3,2", "names seed(s) [2] more than once"),
        ("5-1", "--seeds names no seed"),
    ],
)
def test_parse_seeds_errors(text, message):
    with pytest.raises(JaxMnistError, match=re.escape(message)):
        parse_seeds(text)


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
@pytest.mark.parametrize("seed_axis", ["map", "vmap"])
def test_several_seeds_of_a_model_without_batch_norm(mnist, seed_axis):
    """Models 1-3 have no batch_stats: the seed axis must be read from the other stacked values."""
    from jax_mnist.run import evaluate_seeds, train_epoch

    recipe = small_recipe(model="model_3_lighter_model", dropout_rate=None, seed_axis=seed_axis)
    compiled = programs(recipe, 2)
    train_set = compiled.place_data((mnist.train_images[:SUBSET], mnist.train_labels[:SUBSET]))
    test_set = compiled.place_data((mnist.test_images[:500], mnist.test_labels[:500]))
    states, keys = compiled.init_seeds([1, 2])
    assert jax.tree_util.tree_leaves(states.batch_stats) == []
    states, sums = train_epoch(compiled, states, train_set, keys, 0)
    tests = evaluate_seeds(compiled, states, test_set)
    assert len(tests) == 2 and tests[0] != tests[1]
    assert sums["count"].tolist() == [SUBSET, SUBSET]
