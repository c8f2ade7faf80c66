"""`jax-mnist study`: what is left, how long it may take, and training it, resumably."""

import json

import pytest

from jax_mnist.cli import main
from jax_mnist.study import describe_plan, plan, read_study, run_study, seed_epoch_seconds, study_recipe
from tests.helpers import SUBSET
from tests.test_report import EPOCHS, write_fake_run


def test_plan_lists_what_is_not_complete(tmp_path):
    write_fake_run(tmp_path / "final" / "seed-1", "final", 1, [99.0] * EPOCHS, 30.0)
    write_fake_run(tmp_path / "final" / "seed-2", "final", 2, [99.0] * 2, 30.0)
    todos = plan(tmp_path, ["final", "model_6_gap"], [1, 2, 3], max_epochs=EPOCHS)
    assert [(t.recipe.name, t.recipe.epochs, t.epochs_left) for t in todos] == [
        ("final", EPOCHS, {2: EPOCHS - 2, 3: EPOCHS}),
        ("model_6_gap", EPOCHS, {1: EPOCHS, 2: EPOCHS, 3: EPOCHS}),
    ]
    assert plan(tmp_path, ["final"], [1], max_epochs=EPOCHS) == []
    # Without the cap every recipe runs its registered epochs, so seed 1 has 10 left.
    assert plan(tmp_path, ["final"], [1])[0].epochs_left == {1: 15 - EPOCHS}


def test_estimates_come_from_the_studys_own_timings(tmp_path):
    write_fake_run(tmp_path / "final" / "seed-1", "final", 1, [99.0] * EPOCHS, 30.0)
    study = read_study(tmp_path)
    assert seed_epoch_seconds(study_recipe("final", EPOCHS), study) == (30.0, "measured")
    # Model 7 has model 8's multiply-adds (to 0.1 %): its time is taken as theirs.
    assert seed_epoch_seconds(study_recipe("model_7_max_capacity", EPOCHS), study) == (
        30.0,
        "from a network of about this size",
    )
    # Model 2 is ten times the size and nothing that size is timed: no number is made up.
    assert seed_epoch_seconds(study_recipe("model_2_skeleton", EPOCHS), study) is None
    write_fake_run(tmp_path / "model_2_skeleton" / "seed-1", "model_2_skeleton", 1, [98.0] * EPOCHS, 60.0)
    study = read_study(tmp_path)
    model_1, how = seed_epoch_seconds(study_recipe("model_1_setup", EPOCHS), study)
    assert how == "extrapolated by multiply-adds" and model_1 > 60.0
    text = describe_plan(plan(tmp_path, ["final", "model_1_setup"], [1, 2], max_epochs=EPOCHS), study)
    assert text.splitlines()[1].split()[:3] == ["final", "seeds", "2"]
    assert f"~{EPOCHS * 30 / 60:.0f} min (measured)" in text


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_study_trains_what_is_left_and_resumes(mnist, mnist_data_dir, tmp_path, capsys):
    """Seed 1 first (an interrupted study), then seeds 1-2: seed 1 is left as it was, 2 is trained."""
    lines = []
    run_study(
        tmp_path, ["model_3_lighter_model"], [1], mnist, max_epochs=1, train_examples=SUBSET, log=lines.append
    )
    first = (tmp_path / "model_3_lighter_model" / "seed-1" / "metrics.jsonl").read_text()
    args = [
        "study",
        "--out",
        str(tmp_path),
        "--recipes",
        "model_3_lighter_model",
        "--seeds",
        "1-2",
        "--max-epochs",
        "1",
        "--train-examples",
        str(SUBSET),
        "--data-dir",
        str(mnist_data_dir),
        "--no-download",
    ]
    assert main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "left: 1 recipe(s), 1 seed-epochs" in out and "(measured)" in out
    assert main(args) == 0
    assert (tmp_path / "model_3_lighter_model" / "seed-1" / "metrics.jsonl").read_text() == first
    config = json.loads((tmp_path / "model_3_lighter_model" / "seed-2" / "config.json").read_text())
    assert config["seed"] == 2 and config["recipe"]["epochs"] == 1
    assert main(args + ["--dry-run"]) == 0
    assert "nothing left" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "1-x"], "--seeds takes seeds like 1-5"),
        (["--recipes", "model_9"], "invalid choice"),
    ],
)
def test_study_bad_arguments(args, message, tmp_path, capsys):
    try:
        code = main(["study", "--out", str(tmp_path), "--dry-run", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_runs_of_another_identity_are_not_counted_as_this_studys(tmp_path, capsys):
    """Seeds made on 1,024 examples are another experiment than a full-data study's."""
    from jax_mnist.study import StudyError

    write_fake_run(tmp_path / "final" / "seed-1", "final", 1, [99.0] * EPOCHS, 30.0)
    config_path = tmp_path / "final" / "seed-1" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "train_examples": 1024}))
    with pytest.raises(StudyError, match=r"final/seed-1 \(train_examples: 1024 there, 60000 asked\)"):
        plan(tmp_path, ["final"], [1, 2], max_epochs=EPOCHS)
    assert plan(tmp_path, ["final"], [1, 2], max_epochs=EPOCHS, train_examples=1024)[0].epochs_left == {
        2: EPOCHS
    }
    code = main(
        [
            "study",
            "--out",
            str(tmp_path),
            "--recipes",
            "final",
            "--seeds",
            "1-2",
            "--max-epochs",
            str(EPOCHS),
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "hold other runs than this study asks for" in err


def test_a_longer_step_lr_run_holds_a_shortened_one_a_onecycle_run_does_not(tmp_path):
    from jax_mnist.study import StudyError

    write_fake_run(tmp_path / "final" / "seed-1", "final", 1, [99.0] * EPOCHS, 30.0)
    assert plan(tmp_path, ["final"], [1], max_epochs=3) == []
    write_fake_run(tmp_path / "final_onecycle" / "seed-1", "final_onecycle", 1, [99.0] * EPOCHS, 30.0)
    with pytest.raises(StudyError, match=r"recipe.epochs: 5 there, 3 asked"):
        plan(tmp_path, ["final_onecycle"], [1], max_epochs=3)
