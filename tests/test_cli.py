import argparse
import subprocess
from pathlib import Path

import pytest

from jax_mnist.cli import main, with_flags
from tests.helpers import jax_mnist_command


def test_summary_command_prints_table(capsys):
    assert main(["summary", "model_7_max_capacity"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 7,914" in out
    assert "convblock7" in out and "(N, 2, 2, 12)" in out


@pytest.mark.slow  # spawns processes
def test_summary_unknown_model_is_one_line_error():
    proc = subprocess.run(jax_mnist_command("summary model_9"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'model_9'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_show_augment_writes_png(tmp_path, mnist_data_dir):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "show-augment",
                "--data-dir",
                str(mnist_data_dir),
                "--no-download",
                "--out",
                str(out),
                "--images",
                "3",
                "--copies",
                "4",
            ]
        )
        == 0
    )
    grid = Image.open(out)
    assert grid.size == ((5 * 30 + 2) * 3, (3 * 30 + 2) * 3)


@pytest.mark.slow  # spawns processes
def test_data_command_bad_directory_is_one_line(tmp_path):
    proc = subprocess.run(
        jax_mnist_command("data", data_dir=tmp_path, mnist_files=tmp_path / "nope"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"jax-mnist data: error: {tmp_path / 'nope'}: MNIST files directory not found"
    )


def test_version_is_the_packages(capsys):
    import jax_mnist

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"jax-mnist {jax_mnist.__version__}\n"


def test_recipes_lists_every_registered_recipe_and_prints_one_in_full(capsys):
    import dataclasses
    import json

    from jax_mnist.recipes import RECIPES, changes
    from jax_mnist.summary import summarize

    assert main(["recipes"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0].strip("| `") for row in rows] == list(RECIPES)
    for row, recipe in zip(rows, RECIPES.values()):
        assert row[1] == recipe.model and row[2] == f"{summarize(recipe.model).total_params:,}"
        assert row[3] == ("yes" if recipe.name.startswith("model_") else "no")
        assert row[4].rstrip(" |") == " ".join(changes(recipe))
    assert "schedule=step" in dict(zip(RECIPES, rows))["final"][4]
    assert main(["recipes", "final_translate"]) == 0
    assert json.loads(capsys.readouterr().out) == dataclasses.asdict(RECIPES["final_translate"])


def test_every_option_and_argument_has_help():
    import argparse

    from jax_mnist.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["train", "--recipe", "final", "--epochs", "100000"],
            "epochs must be at most 10,000, found 100,000",
        ),
        (["study", "--seeds", "1-100000", "--dry-run"], "--seeds names more than 10,000 seeds: '1-100000'"),
        (
            ["show-augment", "--out", "grid.npz"],
            "--out grid.npz: show-augment writes a PNG; name a .png file",
        ),
    ],
)
def test_bounds_and_output_kinds_are_one_line_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, no data prepared


@pytest.mark.slow  # spawns a process: JAX's backends start once per process
def test_a_platform_jax_cannot_start_is_one_line_naming_what_it_finds(tmp_path):
    import os

    env = {**os.environ, "JAX_PLATFORMS": "nosuch"}
    proc = subprocess.run(
        jax_mnist_command("summary model_3_lighter_model"),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        "jax-mnist summary: error: JAX_PLATFORMS=nosuch: JAX cannot start that platform"
    )
    assert "it finds: cpu" in proc.stderr or "it finds: gpu" in proc.stderr or "it finds: tpu" in proc.stderr


REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_the_readme_recipe_table_is_what_jax_mnist_recipes_prints(capsys):
    assert main(["recipes"]) == 0
    printed = capsys.readouterr().out
    text = README.read_text()
    start, end = "<!-- jax-mnist recipes -->\n", "<!-- end jax-mnist recipes -->"
    assert text[text.index(start) + len(start) : text.index(end)] == printed, (
        "README's recipe table differs: paste the output of jax-mnist recipes between its markers"
    )


def test_the_readme_model_table_lists_every_model_with_its_computed_figures():
    from jax_mnist.models import MODEL_NAMES, summarize

    rows = {}
    for line in README.read_text().split("## Models", 1)[1].split("\n\n", 2)[1].splitlines()[2:]:
        name, params, field = (cell.strip(" `") for cell in line.strip("|").split("|"))
        rows[name] = (params, field)
    expected = {n: (f"{summarize(n).total_params:,}", str(summarize(n).receptive_field)) for n in MODEL_NAMES}
    assert rows == expected


@pytest.mark.slow  # trains one short epoch in a process
def test_the_quick_start_runs_as_written_and_shows_the_committed_runs_line(
    mnist_files, mnist_data_dir, tmp_path
):
    import json
    import shlex

    from jax_mnist.run import epoch_line

    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    install, command = block.strip().splitlines()
    assert install == "pip install -e ."
    argv = [str(mnist_files) if word == "DIR" else word for word in shlex.split(command)]
    assert argv[0] == "jax-mnist"
    small = [
        "--train-examples",
        "512",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--data-dir",
        str(mnist_data_dir),
    ]
    proc = subprocess.run(jax_mnist_command(argv[1:] + small), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("epoch  1/1  lr ")
    shown = text.split("<!-- quick start output -->\n```\n", 1)[1].split("\n```", 1)[0]
    recipe = argv[argv.index("--recipe") + 1]
    committed = REPO / "results" / "study" / recipe / "seed-1" / "metrics.jsonl"
    last = json.loads(committed.read_text().splitlines()[-1])
    assert shown == epoch_line(last, 15)


def test_a_long_study_plan_is_abbreviated(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "study"), "--seeds", "1-10000", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    plan = [line for line in lines if line.startswith("  ")]
    assert plan and all("seeds 1, 2, 3, 4, 5, 6, 7, 8, …, 10000 (10,000 seeds)" in line for line in plan)
    assert max(len(line) for line in lines) < 200


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("command", ["recipes", "recipes final", "summary model_8_dropout_maxpool"])
def test_a_closed_pipe_ends_quietly_with_the_shells_status(command, tmp_path):
    """`jax-mnist ... | true` (a reader that leaves before the first line, as `head` does after its
    lines): no traceback, and the status a shell gives a SIGPIPE (141)."""
    argv = " ".join(jax_mnist_command(command))
    done = subprocess.run(
        ["bash", "-c", f"{argv} 2>err.txt | true; echo ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err and "Error" not in err, err
    assert done.stdout.strip() == "141"


def test_a_flag_wins_over_set_and_says_so_when_both_are_given(capsys):
    """`--set epochs=2 --epochs 1`: epochs=1, with a warning; the same value twice says nothing."""
    args = argparse.Namespace(epochs=1, lr=0.1, batch_size=None)
    merged = with_flags({"epochs": "2", "lr": "0.10", "degrees": "5"}, args, ("epochs", "lr", "batch_size"))
    assert merged == {"epochs": 1, "lr": 0.1, "degrees": "5"}
    err = capsys.readouterr().err
    assert err == "warning: --epochs 1 and --set epochs=2 both set epochs; the flag wins: epochs=1\n"
