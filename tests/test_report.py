"""The study's report: table and figures from run directories alone, byte for byte; the README's
Results section is that report."""

import dataclasses
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from jax_mnist import report
from jax_mnist.cli import main
from jax_mnist.inference import Evaluation, evaluation_paths, write_evaluation
from jax_mnist.recipes import RECIPE_NAMES, SELECTION, get_recipe
from jax_mnist.study import read_study, seconds_per_seed_epoch, trainings
from jax_mnist.summary import summarize

REPO = Path(__file__).resolve().parents[1]

# A small study written by hand: (recipe, seed) -> test accuracy per epoch; the others not run.
FAKE_TEST_ACCURACIES = {
    ("final", 1): [98.5, 99.0, 99.41, 99.45, 99.40],
    ("final", 2): [98.6, 99.1, 99.38, 99.42, 99.47],
    ("final", 3): [98.4, 99.2, 99.44, 99.46, 99.43],
    ("model_4_batchnorm", 1): [98.0, 98.7, 98.9, 99.0, 99.1],
    ("model_4_batchnorm", 2): [98.1, 98.6, 99.0, 99.05, 99.0],
    ("model_3_lighter_model", 1): [97.0, 98.0],  # unfinished: 2 of 5 epochs
}
EPOCHS = 5


def write_fake_run(out: Path, recipe: str, seed: int, test_accuracies: list[float], seconds: float) -> None:
    out.mkdir(parents=True)
    config = {
        "recipe": dataclasses.asdict(dataclasses.replace(get_recipe(recipe), epochs=EPOCHS)),
        "seed": seed,
        "train_examples": 60000,
        "device": {"platform": "cpu", "kind": "cpu", "count": 1},
    }
    (out / "config.json").write_text(json.dumps(config))
    rows = [
        {
            "epoch": e + 1,
            "lr": 0.1,
            "train_loss": 0.1,
            "train_accuracy": a + 0.2,
            "test_loss": 0.03,
            "test_accuracy": a,
            "epoch_seconds": seconds,
        }
        for e, a in enumerate(test_accuracies)
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_evaluation(run_dir: Path) -> Evaluation:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    logits = rng.normal(size=(500, 10)) + 2.5 * np.eye(10)[labels]  # some errors
    log_probabilities = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    images = rng.integers(0, 256, (500, 28, 28, 1), dtype=np.uint8)
    return Evaluation(str(run_dir), "last", EPOCHS, labels, log_probabilities.astype(np.float32), images)


@pytest.fixture(scope="module")
def fake_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    for (recipe, seed), accuracies in FAKE_TEST_ACCURACIES.items():
        # final's three seeds ran together (one shared time per epoch); model 4's one after another.
        seconds = {"final": 90.0, "model_4_batchnorm": 20.0 + 2 * seed}.get(recipe, 50.0)
        write_fake_run(root / recipe / f"seed-{seed}", recipe, seed, accuracies, seconds)
    evaluation = fake_evaluation(root / "final" / "seed-1")
    write_evaluation(evaluation, *evaluation_paths(root / "final" / "seed-1", "last"))
    return root


def table_row(markdown: str, recipe: str, header: list[str] = report.TABLE_HEADER) -> list[str]:
    """The cells of ``recipe``'s row in the table of ``header`` (the study table by default)."""
    table = markdown.split("| " + " | ".join(header) + " |\n", 1)[1].split("\n\n", 1)[0]
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| `{recipe}` | ")]
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_the_table_reads_the_runs_as_distributions(fake_study, tmp_path):
    markdown = report.render_markdown(fake_study, fake_study, fake_study, "final/seed-1")
    header = report.TABLE_HEADER
    row = dict(zip(header, table_row(markdown, "final")))
    last = [a[-1] for (r, _), a in FAKE_TEST_ACCURACIES.items() if r == "final"]
    assert (
        row["test % at the last epoch: mean ± std (min)"]
        == f"{statistics.mean(last):.2f} ± {statistics.stdev(last):.2f} ({min(last):.2f})"
    )
    assert row["per seed: min test % over the last 3 epochs"] == "99.40, 99.38, 99.43"
    assert row["best test %: mean (min-max)"] == "99.46 (99.45-99.47)"
    assert row["seeds ≥ 99.4 in each of the last 3"] == "2/3"
    assert row["seeds"] == "1-3"
    assert row["params"] == "7,914" and row["RF"] == "28"
    assert row["epochs"] == f"{EPOCHS} (of 15, shortened)"
    assert row["seconds per epoch and seed (median), device"] == "30 s, cpu"  # 90 s shared by 3 seeds
    assert row["original README: best test %"] == "99.43"
    model_4 = dict(zip(header, table_row(markdown, "model_4_batchnorm")))
    assert model_4["seconds per epoch and seed (median), device"] == "23 s, cpu"  # seeds alone: 22 and 24 s
    # Not finished or not run: no figures, never a number.
    write_fake_run(tmp_path / "final" / "seed-4", "final", 4, [99.0, 99.1, 99.2, 99.3, 99.35], 10.0)
    alone = dict(zip(header, table_row(report.render_markdown(tmp_path, tmp_path, tmp_path), "final")))
    assert (
        alone["test % at the last epoch: mean ± std (min)"] == "99.35 (one seed)"
    )  # no spread from one sample
    model_3 = dict(zip(header, table_row(markdown, "model_3_lighter_model")))
    assert model_3["seeds"] == "none finished (unfinished: 1 at epoch 2)"
    assert model_3["test % at the last epoch: mean ± std (min)"] == "—"
    assert table_row(markdown, "model_1_setup")[5] == "not run"
    walk = [ln for ln in markdown.splitlines() if ln.startswith("| `model_4_batchnorm` → `model_5")]
    assert walk and "not run yet" in walk[0]
    assert "![misclassified test images](./misclassified.png)" in markdown


def test_seed_times_shared_by_seeds_trained_together(fake_study):
    study = read_study(fake_study)
    assert seconds_per_seed_epoch(study["final"]) == [30.0] * (3 * EPOCHS)
    assert sorted(set(seconds_per_seed_epoch(study["model_4_batchnorm"]))) == [22.0, 24.0]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_the_report_is_the_same_bytes_every_time(fake_study, tmp_path):
    outputs = []
    for name in ("a", "b"):
        assert main(["report", str(fake_study), "--out", str(tmp_path / name), "--run", "final/seed-1"]) == 0
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    figures = ["confusion.png", "curves.png", "frontier.png", "misclassified.png"]
    assert sorted(outputs[0]) == [*figures, "report.md"]
    assert outputs[0] == outputs[1]
    assert all(
        data.startswith(b"\x89PNG") and len(data) > 10_000
        for n, data in outputs[0].items()
        if n.endswith(".png")
    )
    # A figure does depend on the runs: another result, other bytes.
    write_fake_run(tmp_path / "other" / "final" / "seed-1", "final", 1, [98.0, 98.5, 99.0, 99.1, 99.2], 60.0)
    report.write_figures(tmp_path / "other", tmp_path / "c")
    assert (tmp_path / "c" / "curves.png").read_bytes() != outputs[0]["curves.png"]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_readme_paste_and_check(fake_study, tmp_path):
    readme = tmp_path / "README.md"
    start, end = report.MARKERS
    readme.write_text(f"# Title\n\n## Results\n\n{start}\nold text\n{end}\n\nAfter.\n")
    figures = tmp_path / "figures"
    assert main(["report", str(fake_study), "--out", str(figures), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Results\n\n") and text.endswith(f"{end}\n\nAfter.\n")
    assert "old text" not in text and "](figures/curves.png)" in text
    assert main(["report", str(fake_study), "--out", str(figures), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("2/3", "3/3"))  # a number typed in by hand
    assert main(["report", str(fake_study), "--out", str(figures), "--readme", str(readme), "--check"]) == 2
    readme.write_text("no markers\n")
    assert main(["report", str(fake_study), "--out", str(figures), "--readme", str(readme)]) == 2


def test_a_misplaced_run_is_refused(fake_study, tmp_path, capsys):
    write_fake_run(tmp_path / "final" / "seed-2", "final", 3, [99.0] * EPOCHS, 10.0)
    assert main(["report", str(tmp_path)]) == 2
    assert (
        "holds recipe 'final' seed 3, but its place in the study says recipe 'final' seed 2"
        in capsys.readouterr().err
    )


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_the_readme_results_are_the_report_of_the_committed_study(tmp_path, monkeypatch):
    """The committed study: README section and figures are what `jax-mnist report` makes of it now."""
    monkeypatch.chdir(REPO)  # as `jax-mnist report results/study` is run: from the repository
    study, readme, confirm = Path("results/study"), Path("README.md"), Path("results/confirm")
    expected = report.render_markdown(study, study, ".", confirmation_dir=confirm)
    assert report.pasted_section(readme.read_text()) == expected, (
        "README's Results section differs from the report: run jax-mnist report results/study "
        "--confirmation results/confirm --readme README.md"
    )
    assert (study / "report.md").read_text() == report.render_markdown(
        study, study, study, confirmation_dir=confirm
    )
    written = report.write_figures(study, tmp_path)
    for path in written:
        committed = study / path.name
        assert committed.exists(), f"{committed} is not committed"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} differs from what the report draws now"
        )


def test_linked_figures_exist():
    links = re.findall(r"\]\(([^)]+\.png)\)", report.pasted_section((REPO / "README.md").read_text()))
    assert links and all((REPO / link).exists() for link in links)


def test_seeds_of_another_run_are_left_out_and_said(tmp_path):
    """One row is one experiment: a seed trained with another recipe is never averaged in."""
    for seed in (1, 2, 3):
        write_fake_run(
            tmp_path / "final" / f"seed-{seed}", "final", seed, [98.0, 99.0, 99.4, 99.5, 99.5], 30.0
        )
    config_path = tmp_path / "final" / "seed-3" / "config.json"
    config = json.loads(config_path.read_text())
    config["recipe"]["lr"] = 0.2
    config_path.write_text(json.dumps(config))
    rows = (
        (tmp_path / "final" / "seed-3" / "metrics.jsonl")
        .read_text()
        .replace('"test_accuracy": 99.5', '"test_accuracy": 11.0')
    )
    (tmp_path / "final" / "seed-3" / "metrics.jsonl").write_text(rows)
    row = table_row(report.render_markdown(tmp_path, tmp_path, tmp_path, "final/seed-1"), "final")
    assert row[5] == "1-2 (left out: seed 3: another run: lr 0.2 (the row: 0.1))"
    assert row[6] == "99.50 ± 0.00 (99.50)"


def test_the_number_of_training_examples_is_shown_when_not_all(tmp_path):
    for seed in (1, 2):
        write_fake_run(
            tmp_path / "final" / f"seed-{seed}", "final", seed, [98.0, 99.0, 99.4, 99.5, 99.5], 30.0
        )
        path = tmp_path / "final" / f"seed-{seed}" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "train_examples": 1024}))
    row = table_row(report.render_markdown(tmp_path, tmp_path, tmp_path, "final/seed-1"), "final")
    assert row[4] == "5 (of 15, shortened), on 1,024 training examples"


def test_a_missing_study_or_a_nan_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: no such study directory" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    write_fake_run(tmp_path / "final" / "seed-1", "final", 1, [98.0, 99.0, 99.4, 99.5, float("nan")], 30.0)
    write_fake_run(tmp_path / "final" / "seed-2", "final", 2, [98.0, 99.0, 99.4, 99.5, 99.5], 30.0)
    assert main(["report", str(tmp_path)]) == 0
    row = table_row((tmp_path / "report.md").read_text(), "final")
    assert (
        "left out: seed 1: train_accuracy is not finite at epoch 5" in row[5] and row[6] == "99.50 (one seed)"
    )


def test_curve_limits_come_from_the_data_and_keep_the_target_in_view():
    from jax_mnist.report import accuracy_limits

    weak = np.array([[60.0, 80.0, 85.0, 90.0]])  # a short run of a small net
    low, high = accuracy_limits([weak])
    assert low < 85.0 and high > 99.4  # its second half and the 99.4 line are both drawn
    strong = np.array([[98.0, 99.3, 99.45, 99.5], [98.2, 99.35, 99.5, 99.55]])
    low, high = accuracy_limits([strong])
    assert 99.0 < low < 99.4 and 99.55 < high <= 100.0  # zoomed in on where the runs settle
    assert accuracy_limits([]) == (98.4, 99.9)


def test_each_training_is_its_seeds_and_wall_minutes(fake_study):
    """Seeds trained together (one shared time per epoch) are one training; the minutes are the
    sum of the recorded epoch times, never typed in."""
    study = read_study(fake_study)
    assert trainings(study["final"]) == [([1, 2, 3], 90.0 * EPOCHS)]
    assert trainings(study["model_4_batchnorm"]) == [([1], 22.0 * EPOCHS), ([2], 24.0 * EPOCHS)]
    markdown = report.render_markdown(fake_study, fake_study, fake_study, "final/seed-1")
    row = dict(zip(report.TABLE_HEADER, table_row(markdown, "model_4_batchnorm")))
    assert row["wall minutes of each training (seeds trained together: minutes)"] == "1: 1.8; 2: 2.0"


@pytest.fixture
def confirmation(tmp_path):
    """final on two fresh seeds (one holds), ours_8k on one unfinished."""
    root = tmp_path / "confirm"
    write_fake_run(root / "final" / "seed-21", "final", 21, [98.0, 99.0, 99.41, 99.42, 99.45], 60.0)
    write_fake_run(root / "final" / "seed-22", "final", 22, [98.0, 99.0, 99.39, 99.42, 99.45], 60.0)
    write_fake_run(root / "ours_8k" / "seed-21", "ours_8k", 21, [98.0, 99.0], 60.0)
    return root


def test_confirmation_seeds_are_a_table_of_their_own_beside_how_each_recipe_was_chosen(
    fake_study, confirmation
):
    markdown = report.render_markdown(fake_study, fake_study, fake_study, "final/seed-1", confirmation)
    assert f"`jax-mnist report {fake_study.as_posix()} --confirmation {confirmation.as_posix()}`" in markdown
    row = dict(zip(report.CONFIRMATION_HEADER, table_row(markdown, "final", report.CONFIRMATION_HEADER)))
    assert row["how it was chosen"] == SELECTION["final"]
    assert row["study seeds: held ≥ 99.4 in each of the last 3"] == "2/3"
    assert row["confirmation seeds"] == "21-22"
    assert row["test % at the last epoch: mean ± std (min)"] == "99.45 ± 0.00 (99.45)"
    assert row["per seed: min test % over the last 3 epochs"] == "99.41, 99.39"
    assert row["seeds ≥ 99.4 in each of the last 3"] == "1/2"
    ours = table_row(markdown, "ours_8k", report.CONFIRMATION_HEADER)
    assert ours[3] == "not run" and ours[4] == "none finished (unfinished: 21 at epoch 2)" and ours[5] == "—"
    assert table_row(markdown, "model_1_setup", report.CONFIRMATION_HEADER)[4:] == ["not run", "—", "—", "—"]
    # The study table is the study's seeds alone.
    assert table_row(markdown, "final")[5] == "1-3"


def test_every_registered_recipe_says_how_it_was_chosen():
    assert set(SELECTION) == set(RECIPE_NAMES)
    assert all(SELECTION.values())


def test_the_headline_states_the_confirmation_seeds(fake_study, confirmation, tmp_path):
    """The smallest holding recipe's sentence says what its fresh seeds held (or that it has none)."""
    study = tmp_path / "holds"
    for seed in range(1, 6):
        write_fake_run(study / "final" / f"seed-{seed}", "final", seed, [98.0, 99.0, 99.5, 99.5, 99.5], 30.0)
    results = report.collect(read_study(study))
    summaries = {r.model: summarize(r.model) for r in results}
    confirmed = report.collect(read_study(confirmation))
    sentence = report.smallest_holding(results, summaries, confirmed)
    assert sentence.endswith(
        "On its confirmation seeds (21-22, never used for any choice) it holds on 1/2, last epoch "
        "99.45 ± 0.00."
    )
    assert report.smallest_holding(results, summaries, []).endswith(
        "It has no finished confirmation seed yet."
    )
    assert "confirmation" not in report.smallest_holding(results, summaries)


def test_runs_of_one_recipe_made_by_other_code_or_versions_are_named(tmp_path):
    for seed, commit, dirty, jax_version in ((1, "a" * 40, False, "0.10.2"), (2, "b" * 40, True, "0.12.1")):
        out = tmp_path / "final" / f"seed-{seed}"
        write_fake_run(out, "final", seed, [98.0, 99.0, 99.4, 99.5, 99.5], 30.0)
        config = json.loads((out / "config.json").read_text())
        config["code"] = {"commit": commit, "dirty": dirty, "recipe_schema": 1}
        config["versions"] = {"jax": jax_version, "flax": "0.12.8"}
        (out / "config.json").write_text(json.dumps(config))
    out = tmp_path / "final" / "seed-3"  # made before config.json recorded the code
    write_fake_run(out, "final", 3, [98.0, 99.0, 99.4, 99.5, 99.5], 30.0)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "versions": {"jax": "0.10.2", "flax": "0.12.8"}}))
    markdown = report.render_markdown(tmp_path, tmp_path, tmp_path, "final/seed-1")
    assert (
        "- `final` was made by different code: commit aaaaaaaaaa (seeds 1); commit bbbbbbbbbb (dirty) "
        "(seeds 2); commit not recorded (seeds 3)" in markdown
    )
    assert (
        "- `final` was made by different versions: jax 0.10.2 (seeds 1, 3); jax 0.12.1 (seeds 2)" in markdown
    )
    # One commit and one set of versions: nothing said.
    (tmp_path / "final" / "seed-2").rename(tmp_path / "other")
    (tmp_path / "final" / "seed-3").rename(tmp_path / "other-3")
    assert "made by different" not in report.render_markdown(tmp_path, tmp_path, tmp_path, "final/seed-1")


def test_a_missing_confirmation_directory_is_one_line(fake_study, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.MARKERS[0]}\n{report.MARKERS[1]}\n")
    argv = ["report", str(fake_study), "--out", str(tmp_path / "f"), "--confirmation", str(tmp_path / "none")]
    assert main(argv + ["--readme", str(readme)]) == 2
    assert "none: no such study directory" in capsys.readouterr().err
    assert readme.read_text() == f"{report.MARKERS[0]}\n{report.MARKERS[1]}\n"


def test_recipes_of_nearly_equal_size_are_drawn_apart_in_size_order():
    """frontier.png: equal or nearly equal counts get distinct x positions, still in size order,
    centred on their sizes; a count far from the others stays where it is."""
    params = [7914, 7788, 7914, 2112, 7830]
    xs = report.spread_positions(params)
    assert xs[3] == 2112
    crowd = sorted([0, 1, 2, 4], key=lambda i: (params[i], i))
    assert [xs[i] for i in crowd] == sorted(xs[i] for i in crowd)
    assert len({xs[i] for i in crowd}) == 4
    assert all(x > 0.8 * 7788 and x < 1.2 * 7914 for x in (xs[i] for i in crowd))


@pytest.mark.parametrize(
    "layout",
    [
        "{recipe}/seed-{seed}",  # a study
        "{recipe}-seed{seed}",  # train's runs/ (the quick start's default --out)
        "seed-{seed}",  # one train --seeds --out directory
    ],
)
def test_the_report_reads_trains_layouts_too(tmp_path, layout):
    for seed in (1, 2):
        out = tmp_path / layout.format(recipe="final", seed=seed)
        write_fake_run(out, "final", seed, [98.0, 99.0, 99.4, 99.5, 99.5], 30.0)
    row = table_row(report.render_markdown(tmp_path, tmp_path, tmp_path), "final")
    assert row[5] == "1-2" and row[6] == "99.50 ± 0.00 (99.50)"


def test_one_run_directory_is_a_report_of_one_seed(tmp_path):
    write_fake_run(tmp_path / "run", "final", 3, [98.0, 99.0, 99.4, 99.5, 99.45], 30.0)
    row = table_row(report.render_markdown(tmp_path / "run", tmp_path, tmp_path), "final")
    assert row[5] == "3" and row[6] == "99.45 (one seed)"


def test_a_directory_without_runs_or_a_run_that_is_not_there_is_one_line(fake_study, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "empty: no run found (it holds notes.txt); expected one of: <recipe>/seed-<s>/config.json" in err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["notes.txt"]
    for named in ("nosuch/seed-9", "final"):
        assert main(["report", str(fake_study), "--out", str(tmp_path / "f"), "--run", named]) == 2
        assert f"--run {named}: {fake_study / named} is not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
