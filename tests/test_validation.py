"""The validation split (issue 21): a fixed set of training examples held out, never trained on,
the same for every seed; screening runs are scored on it alone; the report's screening table and
the accuracy-per-parameter frontier read the runs."""

import json

import numpy as np
import pytest

from jax_mnist import report
from jax_mnist.cli import main
from jax_mnist.data import DataError, Mnist, split_validation, validation_digest, validation_indices
from jax_mnist.errors import ConfigError
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.run import epoch_line
from jax_mnist.rundir import read_run, run_identity
from jax_mnist.study import read_study
from tests.test_report import EPOCHS, write_fake_run

# --------------------------------------------------------------------------- the split


def test_the_held_out_examples_are_fixed_evenly_spaced_and_distinct():
    held = validation_indices(60_000, 10_000)
    assert held.tolist() == list(range(0, 60_000, 6))
    odd = validation_indices(1_000, 7)
    assert odd.tolist() == [0, 142, 285, 428, 571, 714, 857]  # floor(i * 1000 / 7)
    assert len(set(validation_indices(60_000, 4_999).tolist())) == 4_999
    assert validation_indices(60_000, 0).size == 0
    # They depend on the two sizes only: the digest a run records is the same wherever it is made.
    assert validation_digest(60_000, 10_000) == validation_digest(60_000, 10_000)
    assert validation_digest(60_000, 10_000) != validation_digest(60_000, 9_999)


@pytest.mark.parametrize("validation", [-1, 1_000])
def test_a_split_that_holds_out_everything_or_less_than_nothing_is_refused(validation):
    with pytest.raises(DataError, match=f"found {validation:,}"):
        validation_indices(1_000, validation)


def test_the_split_keeps_the_rest_in_order_and_none_of_the_held_out():
    n = 600
    images = np.arange(n, dtype=np.int64).reshape(n, 1, 1, 1)  # each image says which example it is
    labels = np.arange(n, dtype=np.int32)
    (train_images, train_labels), (val_images, val_labels) = split_validation(images, labels, 50)
    held = validation_indices(n, 50)
    assert val_labels.tolist() == held.tolist() and val_images.ravel().tolist() == held.tolist()
    assert train_labels.tolist() == [i for i in range(n) if i not in set(held.tolist())]
    assert not set(train_images.ravel().tolist()) & set(held.tolist())
    (all_images, _), (none, _) = split_validation(images, labels, 0)
    assert all_images is images and none.shape == (0, 1, 1, 1)


def test_validation_is_a_recipe_field_stated_in_the_run_identity():
    recipe = with_overrides(get_recipe("ours_5k"), {"validation": "10000"})
    assert recipe.validation == 10_000
    identity = run_identity(recipe, 3, 50_000)
    assert identity["validation_split"]["examples"] == 10_000
    assert identity["validation_split"]["held_out_of"] == 60_000
    assert identity["validation_split"]["sha256"] == validation_digest(60_000, 10_000)
    assert (
        run_identity(recipe, 3, 50_000)["validation_split"]
        == run_identity(recipe, 4, 50_000)["validation_split"]
    )
    assert "validation_split" not in run_identity(get_recipe("ours_5k"), 3, 60_000)
    with pytest.raises(ConfigError, match="validation must be >= 0, found -5"):
        with_overrides(get_recipe("ours_5k"), {"validation": -5})


def test_a_validation_row_prints_its_validation_figures():
    row = {
        "epoch": 2,
        "lr": 0.1,
        "train_loss": 0.2,
        "train_accuracy": 97.0,
        "val_loss": 0.05,
        "val_accuracy": 98.76,
        "epoch_seconds": 3.0,
    }
    line = epoch_line(row, 15)
    assert "val loss 0.0500 acc 98.76%" in line and "test" not in line


def test_a_candidate_is_named_by_the_registered_recipe_it_varies():
    from jax_mnist.recipes import nearest_registered

    assert nearest_registered(get_recipe("ours_8k_scale")) == ("ours_8k_scale", [])
    scaled = with_overrides(get_recipe("ours_5k"), {"name": "c", "scale_min": 0.9, "scale_max": 1.1})
    # ours_8k_scale differs in fewer fields (the model), but a recipe of the same model comes first.
    assert nearest_registered(scaled) == ("ours_5k", ["scale_min=0.9", "scale_max=1.1"])
    # No recipe of ours_5k_pad: among all, ours_5k and ours_8k differ in the model alone; the one
    # of the nearest parameter count is named.
    padded = with_overrides(get_recipe("ours_5k"), {"model": "ours_5k_pad", "validation": 100})
    assert nearest_registered(padded) == ("ours_5k", ["model=ours_5k_pad", "validation=100"])


# --------------------------------------------------------------------------- training with it


def marked_data(n: int = 1_280, validation: int = 128) -> Mnist:
    """Noise images of classes 0-8, except the examples ``validation_indices`` holds out: white
    images of class 9. Trained on, white -> 9 is learned at once; never trained on, a net never
    sees class 9 and does not predict it. The test split is those white images too."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 9, n).astype(np.int32)
    held = validation_indices(n, validation)
    images[held], labels[held] = 255, 9
    white = np.full((validation, 28, 28, 1), 255, np.uint8)
    return Mnist(images, labels, white, np.full(validation, 9, np.int32))


SCREEN = {"epochs": 2, "batch_size": 64, "augment": "none", "degrees": 0.0, "translate": 0.0}


@pytest.mark.slow  # trains four short runs
def test_held_out_examples_are_never_trained_on_and_the_same_for_every_seed(tmp_path):
    from jax_mnist.run import seed_dirs, train_seeds

    data = marked_data()
    quiet = {"log": lambda line: None, "progress": False}
    # Control: without a split the white 9s are trained on, and the test split (white 9s) is learned.
    control = with_overrides(get_recipe("ours_5k"), SCREEN)
    (history,) = train_seeds(control, data, {1: tmp_path / "control"}, **quiet).values()
    assert history[-1]["test_accuracy"] > 90
    # With the split they are held out: scored on, never trained on.
    screening = with_overrides(control, {"validation": 128})
    dirs = seed_dirs(tmp_path / "screen", [1, 2])
    histories = train_seeds(screening, data, dirs, **quiet)
    for rows in histories.values():
        assert all(row["val_accuracy"] == 0.0 for row in rows), rows
        assert all("test_accuracy" not in row and "test_loss" not in row for row in rows)
        assert [row["epoch"] for row in rows] == [1, 2]
    configs = [json.loads((d / "config.json").read_text()) for d in dirs.values()]
    assert configs[0]["validation_split"] == configs[1]["validation_split"]
    assert configs[0]["validation_split"]["sha256"] == validation_digest(1_280, 128)
    assert configs[0]["train_examples"] == 1_280 - 128
    assert configs[0]["seed"] != configs[1]["seed"]
    # The seeds differ, the examples they are scored on do not.
    record = read_run(dirs[1])
    assert record.scored_split == "val" and record.accuracies("val") == [0.0, 0.0]
    # The same directory resumes as a validation run: the identity matches.
    again = train_seeds(screening, data, dirs, resume=True, **quiet)
    assert again == histories


@pytest.mark.slow  # trains a short run through the command line
def test_the_validation_flag(tmp_path, mnist_data_dir, capsys):
    out = tmp_path / "run"
    args = ["train", "--recipe", "ours_5k", "--validation", "500", "--train-examples", "256"]
    args += ["--epochs", "1", "--batch-size", "128", "--out", str(out), "--data-dir", str(mnist_data_dir)]
    assert main(args) == 0
    (row,) = read_run(out).history
    assert "val_accuracy" in row and "test_accuracy" not in row
    assert read_run(out).config["validation_split"]["held_out_of"] == 60_000
    capsys.readouterr()
    too_many = ["train", "--recipe", "ours_5k", "--validation", "60000", "--out", str(tmp_path / "x")]
    assert main([*too_many, "--data-dir", str(mnist_data_dir)]) == 2
    assert "validation must hold out fewer than the 60,000 training examples, found 60,000" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- the report of it


def write_screening_run(out, name: str, seed: int, val_accuracies: list[float], seconds: float, **fields):
    """A screening run written by hand: recipe ``name`` (an ours_5k variant), scored on 10,000
    validation examples."""
    write_fake_run(out, "ours_5k", seed, val_accuracies, seconds)
    config = json.loads((out / "config.json").read_text())
    config["recipe"] |= {"name": name, "validation": 10_000, **fields}
    config["train_examples"] = 50_000
    (out / "config.json").write_text(json.dumps(config))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["val_loss"], row["val_accuracy"] = row.pop("test_loss"), row.pop("test_accuracy")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def screening_study(root):
    write_screening_run(root / "c5k_a" / "seed-11", "c5k_a", 11, [99.0, 99.3, 99.45, 99.5, 99.42], 30.0)
    write_screening_run(root / "c5k_a" / "seed-12", "c5k_a", 12, [99.0, 99.3, 99.35, 99.5, 99.5], 42.0)
    write_screening_run(
        root / "c5k_b" / "seed-11", "c5k_b", 11, [98.0, 99.0, 99.1, 99.2, 99.3], 60.0, degrees=7.0
    )
    return root


def test_the_screening_table_reads_validation_figures(tmp_path, capsys):
    root = screening_study(tmp_path / "screening")
    markdown = report.render_screening(root)
    assert "10,000 training examples each run held out" in markdown
    lines = {
        ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")]
        for ln in markdown.splitlines()
        if ln.startswith("| `")
    }
    row = dict(zip(report.SCREENING_HEADER, lines["`c5k_a`"]))
    assert row["validation % at the last epoch: mean ± std (min)"] == "99.46 ± 0.06 (99.42)"
    assert row["per seed: min validation % over the last 3 epochs"] == "99.42, 99.35"
    assert row["seeds ≥ 99.4 in each of the last 3"] == "1/2"
    assert row["params"] == "4,888" and row["seeds"] == "11-12"
    assert row["epochs"] == f"{EPOCHS}, on 50,000 training examples"
    assert (
        row["recipe: the nearest registered one + what differs"] == "`ours_5k` + epochs=5, validation=10000"
    )
    # Seeds that ran alone (30 and 42 s per epoch): (150 + 210) / 2 s per seed.
    assert row["wall minutes per seed (mean), device"] == "3.0, cpu"
    other = dict(zip(report.SCREENING_HEADER, lines["`c5k_b`"]))
    assert other["recipe: the nearest registered one + what differs"] == (
        "`ours_5k` + epochs=5, validation=10000, degrees=7.0"
    )
    assert other["validation % at the last epoch: mean ± std (min)"] == "99.30 (one seed)"
    # The command prints it and writes screening.md; a study without screening runs is one line.
    assert main(["report", str(root), "--screening"]) == 0
    assert (root / "screening.md").read_text() == markdown
    assert markdown in capsys.readouterr().out
    # Pasted into a document between its marker lines, and checked against the runs.
    doc = tmp_path / "accuracy.md"
    start, end = report.SCREENING_MARKERS
    doc.write_text(f"# Log\n\n{start}\nold\n{end}\n\nAfter.\n")
    assert main(["report", str(root), "--screening", "--readme", str(doc)]) == 0
    assert doc.read_text() == f"# Log\n\n{start}\n{markdown}{end}\n\nAfter.\n"
    assert main(["report", str(root), "--screening", "--readme", str(doc), "--check"]) == 0
    doc.write_text(doc.read_text().replace("1/2", "2/2"))  # a figure typed in by hand
    assert main(["report", str(root), "--screening", "--readme", str(doc), "--check"]) == 2
    assert "is not what jax-mnist report" in capsys.readouterr().err
    # A document with the tables of two directories: each between the markers that name it.
    other = tmp_path / "other"
    write_screening_run(other / "c5k_c" / "seed-11", "c5k_c", 11, [99.0, 99.1, 99.2, 99.3, 99.4], 20.0)
    named = [
        f"<!-- screening table of {d.as_posix()}: {w} -->" for d in (root, other) for w in ("start", "end")
    ]
    doc.write_text(f"{named[0]}\nold\n{named[1]}\nmiddle\n{named[2]}\nold\n{named[3]}\n")
    for directory in (root, other):
        assert main(["report", str(directory), "--screening", "--readme", str(doc)]) == 0
    expected = (
        f"{named[0]}\n{markdown}{named[1]}\nmiddle\n{named[2]}\n{report.render_screening(other)}{named[3]}\n"
    )
    assert doc.read_text() == expected
    assert main(["report", str(other), "--screening", "--readme", str(doc), "--check"]) == 0
    write_fake_run(tmp_path / "study" / "final" / "seed-1", "final", 1, [99.0] * EPOCHS, 10.0)
    assert main(["report", str(tmp_path / "study"), "--screening"]) == 2
    assert "no run scored on a validation split" in capsys.readouterr().err


def test_screening_runs_stay_out_of_the_study_table(tmp_path):
    write_fake_run(tmp_path / "ours_5k" / "seed-1", "ours_5k", 1, [99.0, 99.2, 99.41, 99.45, 99.43], 10.0)
    write_screening_run(tmp_path / "ours_5k" / "seed-2", "ours_5k", 2, [99.0, 99.2, 99.5, 99.5, 99.5], 10.0)
    write_screening_run(tmp_path / "c5k_a" / "seed-11", "c5k_a", 11, [99.0] * EPOCHS, 10.0)
    results = {r.name: r for r in report.collect(read_study(tmp_path))}
    assert [r.seed for r in results["ours_5k"].runs] == [1]
    assert "a screening run, scored on its validation split" in results["ours_5k"].left_out[0][1]
    assert "c5k_a" not in results  # a screening-only candidate has no row among the reported recipes
    screened = {r.name: r for r in report.collect(read_study(tmp_path), split="val")}
    assert sorted(screened) == ["c5k_a", "ours_5k"] and [r.seed for r in screened["ours_5k"].runs] == [2]


# --------------------------------------------------------------------------- the frontier


def frontier_study(root):
    """Three recipes: model 8 (7,914 parameters) 2 seeds, ours_5k (4,888) 5 seeds holding, ours_8k
    (7,788) 5 seeds worse than ours_5k."""
    for seed in (1, 2):
        write_fake_run(root / "final" / f"seed-{seed}", "final", seed, [99.0, 99.3, 99.5, 99.6, 99.55], 10.0)
    for seed in range(1, 6):
        write_fake_run(
            root / "ours_5k" / f"seed-{seed}",
            "ours_5k",
            seed,
            [99.0, 99.2, 99.41, 99.45, 99.43 + seed / 100],
            10.0,
        )
        write_fake_run(
            root / "ours_8k" / f"seed-{seed}", "ours_8k", seed, [99.0, 99.2, 99.3, 99.3, 99.3], 10.0
        )
    return root


def test_the_frontier_points_and_the_smallest_net_that_holds(tmp_path):
    from jax_mnist.summary import summarize

    results = report.collect(read_study(frontier_study(tmp_path)))
    summaries = {r.model: summarize(r.model) for r in results}
    points = {p["name"]: p for p in report.frontier_points(results, summaries)}
    assert sorted(points) == ["final", "ours_5k", "ours_8k"]
    assert points["ours_5k"]["params"] == 4_888 and points["ours_5k"]["held"] == 5
    assert points["ours_5k"]["frontier"] and points["final"]["frontier"]
    assert not points["ours_8k"]["frontier"]  # ours_5k has fewer parameters and a higher mean
    assert points["final"]["held"] == 2 and points["final"]["seeds"] == 2
    sentence = report.smallest_holding(results, summaries)
    assert "`ours_5k` (4,888 parameters)" in sentence and "5 of 5" in sentence
    # Two seeds that hold are not a headline: fewer than 5 seeds never count.
    for seed in (1, 2):
        write_fake_run(tmp_path / "c" / "final" / f"seed-{seed}", "final", seed, [99.5] * EPOCHS, 10.0)
    assert report.smallest_holding(report.collect(read_study(tmp_path / "c")), summaries).startswith(
        "No recipe holds"
    )


@pytest.mark.slow  # draws figures
def test_the_report_draws_the_frontier_and_links_it(tmp_path):
    root = frontier_study(tmp_path / "study")
    written = report.write_figures(root, tmp_path / "figures")
    assert tmp_path / "figures" / "frontier.png" in written
    first = (tmp_path / "figures" / "frontier.png").read_bytes()
    assert first.startswith(b"\x89PNG")
    report.write_figures(root, tmp_path / "again")
    assert (tmp_path / "again" / "frontier.png").read_bytes() == first
    write_fake_run(root / "ours_8k" / "seed-6", "ours_8k", 6, [99.0, 99.2, 99.3, 99.3, 99.6], 10.0)
    report.write_figures(root, tmp_path / "changed")
    assert (tmp_path / "changed" / "frontier.png").read_bytes() != first
    markdown = report.render_markdown(root, root, root)
    assert "![accuracy per parameter](./frontier.png)" in markdown
    assert "`ours_5k` (4,888 parameters)" in markdown


@pytest.mark.slow  # reads every committed screening run
def test_the_committed_screening_table_is_the_report_of_the_runs(monkeypatch):
    """docs/accuracy.md's screening table and results/screening-val/screening.md are what
    `jax-mnist report results/screening-val --screening` makes of the committed runs now."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # as the command is run: from the repository
    made = report.render_screening("results/screening-val")
    assert Path("results/screening-val/screening.md").read_text() == made
    docs = Path("docs/accuracy.md").read_text()
    start, end = "<!-- screening table: start -->\n", "<!-- screening table: end -->"
    assert docs.split(start, 1)[1].split(end, 1)[0] == made
    # The tables of the searches (issue 35), each between the markers naming its directory.
    import re

    named = re.findall(r"<!-- screening table of (\S+): start -->", docs)
    assert "results/search-issue35/5k-ema" in named
    for directory in named:
        made = report.render_screening(directory)
        assert Path(directory, "screening.md").read_text() == made
        section = report.pasted_section(docs, "docs/accuracy.md", report.screening_markers(docs, directory))
        assert section == made, f"docs/accuracy.md: the table of {directory} is not its report now"
