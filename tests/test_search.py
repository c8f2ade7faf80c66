"""jax-mnist search: its space and settings checked before anything is written, and a tiny real
search (2 fields, 512 examples) resumed, continued after a kill, and shared by two workers."""

import json
import signal
import subprocess

import pytest

from jax_mnist.cli import main
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.search import SearchError, make_search, parse_space
from tests.helpers import jax_mnist_command, spawn

BASE = with_overrides(get_recipe("ours_2k"), {"validation": 1000, "epochs": 1})
TINY = (
    "--recipe ours_2k --space batch_size=128,256 --space lr=0.05,0.1 --validation 1000 --train-examples 512"
)


def test_a_space_is_parsed_by_the_recipe():
    space = parse_space(BASE, ["batch_size=32, 64", "lr=0.05,0.1", "nesterov=true,false"])
    assert space == {"batch_size": [32, 64], "lr": [0.05, 0.1], "nesterov": [True, False]}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lr", "--space takes FIELD=V1,V2,..., found 'lr'"),
        ("lr=", "--space takes FIELD=V1,V2,..., found 'lr='"),
        ("lr=0.1,,0.2", "--space lr=0.1,,0.2: an empty value"),
        ("lr=x", "--space lr=x: lr takes a float, found 'x'"),
        ("lr=-1", "--space: the combination lr=-1.0 is not a valid recipe: recipe ours_2k: lr must be a"),
        ("colour=red", "--space colour=red: unknown recipe field 'colour'; valid: "),
        ("name=a,b", "--space name=a,b: name is set by the search itself"),
        ("validation=5,6", "--space validation=5,6: validation is set by the search itself"),
        ("batch_size=64,64", "--space batch_size=64,64: value(s) 64 given more than once"),
    ],
)
def test_a_bad_space_is_one_line(spec, message):
    with pytest.raises(SearchError) as error:
        parse_space(BASE, [spec])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_every_combination_must_be_a_recipe():
    with pytest.raises(
        SearchError, match="the combination scale_min=0.9, scale_max=0.8 is not a valid recipe"
    ):
        parse_space(BASE, ["scale_min=0.9,1.05", "scale_max=0.8,1.1"])
    # Fields that are only valid together: scale_min=1.05 with scale_max=1.1.
    assert parse_space(BASE, ["scale_min=1.05", "scale_max=1.1"]) == {"scale_min": [1.05], "scale_max": [1.1]}
    with pytest.raises(SearchError, match="names lr twice"):
        parse_space(BASE, ["lr=0.1", "lr=0.2"])


def test_settings_are_checked():
    space = {"lr": [0.05, 0.1]}
    test_scored = with_overrides(BASE, {"validation": 0})
    with pytest.raises(SearchError, match="give --validation N"):
        make_search(test_scored, space, None)
    assert make_search(test_scored, space, None, allow_test=True).trials == 2
    assert make_search(BASE, space, None).trials == 2  # a grid: every combination
    with pytest.raises(SearchError, match="the grid has only 2 combination"):
        make_search(BASE, space, 3)
    with pytest.raises(SearchError, match="--trials N is needed with --sampler tpe"):
        make_search(BASE, space, None, sampler="tpe")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--space", "lr=x"], "--space lr=x: lr takes a float, found 'x'"),
        (["--space", "lr=0.1", "--validation", "0"], "give --validation N"),
        (["--space", "lr=0.1", "--trials", "2"], "the grid has only 1 combination"),
    ],
)
def test_the_command_refuses_bad_values_in_one_line_writing_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "search"
    code = main(["search", "--recipe", "ours_2k", "--out", str(out), "--validation", "1000", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("jax-mnist search: error: ") and message in err
    assert err.count("\n") == 1 and not out.exists()


def _journal_states(out):
    """Optuna's journal read back through Optuna: trial number -> (state, params)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(out / "optuna-journal.log")))
    study = optuna.load_study(study_name="search", storage=storage)
    return {t.number: (t.state.name, t.params) for t in study.get_trials()}


def _search(out, data_dir, *extra, **options):
    return jax_mnist_command(["search", *TINY.split(), *extra], out=out, data_dir=data_dir, **options)


@pytest.mark.slow  # spawns processes that train
def test_the_same_command_resumes_without_repeating_a_trial(mnist_data_dir, tmp_path):
    out = tmp_path / "search"
    first = subprocess.run(
        _search(out, mnist_data_dir, "--epochs", "1", "--trials", "2"), capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(" starts -> ") == 2
    again = subprocess.run(
        _search(out, mnist_data_dir, "--epochs", "1", "--trials", "3"), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(" starts -> ") == 1 and "trial-002" in again.stdout
    states = _journal_states(out)
    assert [s for s, _ in states.values()] == ["COMPLETE"] * 3
    assert len({tuple(sorted(p.items())) for _, p in states.values()}) == 3  # three different points
    for number, (_, params) in states.items():
        config = json.loads((out / f"trial-{number:03d}" / "seed-11" / "config.json").read_text())
        assert {k: config["recipe"][k] for k in params} == params and config["recipe"]["validation"] == 1000
    table = subprocess.run(jax_mnist_command(["report", out, "--screening"]), capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert all(f"`trial-00{n}`" in table.stdout for n in range(3))
    # Other settings on the same directory: refused, nothing changed.
    before = (out / "optuna-journal.log").read_bytes()
    other = subprocess.run(_search(out, mnist_data_dir, "--epochs", "2"), capture_output=True, text=True)
    assert other.returncode == 2 and "holds another search (it differs in: recipe" in other.stderr
    assert (out / "optuna-journal.log").read_bytes() == before


@pytest.mark.slow  # spawns processes that train
def test_a_killed_trial_is_continued_from_its_checkpoint(mnist_data_dir, tmp_path):
    out = tmp_path / "search"
    command = _search(out, mnist_data_dir, "--epochs", "2", "--trials", "1")
    process = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("epoch  1/2"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert _journal_states(out)[0][0] == "RUNNING"
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "trial-000" in done.stdout and " continues -> " in done.stdout
    assert "resumed from the checkpoint of epoch 1" in done.stdout and "epoch  1/2" not in done.stdout
    assert _journal_states(out)[0][0] == "COMPLETE"


@pytest.mark.slow  # spawns processes that train
def test_two_workers_share_the_trials(mnist_data_dir, tmp_path):
    out = tmp_path / "search"
    command = _search(out, mnist_data_dir, "--epochs", "1")
    # The first creates the search; the second joins it while the first trains.
    first = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if " starts -> " in line:
            break
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    lines += first.stdout.readlines()
    first.wait(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    started = lambda text: {w.split()[1] for w in text.splitlines() if " starts -> " in w}
    mine, theirs = started("".join(lines)), started(second.stdout)
    assert mine and theirs and not mine & theirs
    assert mine | theirs == {f"trial-00{n}" for n in range(4)}
    assert [s for s, _ in _journal_states(out).values()] == ["COMPLETE"] * 4
