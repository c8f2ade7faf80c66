"""Bad input of every kind is one line, a non-zero exit, nothing written, no traceback."""

import gzip
import json
import shutil

import numpy as np
import pytest

from jax_mnist import data as data_lib
from jax_mnist.cli import main
from jax_mnist.data import DataError, dataset_dir, load_mnist
from jax_mnist.errors import CheckpointError
from tests.helpers import jax_mnist_command, spawn


def one_line_error(capsys, argv, message, tmp_path=None):
    code = main(argv)
    err = "".join(
        line for line in capsys.readouterr().err.splitlines(True) if not line.startswith("[jax_mnist.data]")
    )
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err


@pytest.mark.parametrize(
    "setting,message",
    [
        ("degrees=nan", "degrees must be a finite number in [0, 180], found nan"),
        ("momentum=-5", "momentum must be a finite number in [0, 1), found -5.0"),
        ("dropout_rate=1.0", "dropout_rate must be a finite number in [0, 1), found 1.0"),
        ("dropout_rate=-0.5", "dropout_rate must be a finite number in [0, 1), found -0.5"),
        ("lr=inf", "lr must be a finite number > 0, found inf"),
        ("gamma=0", "gamma must be a finite number in (0, 1], found 0.0"),
        ("scale_min=2", "scale_min must be <= scale_max (1.0), found 2.0"),
        ("base_momentum=0.99", "base_momentum must be <= max_momentum (0.95), found 0.99"),
        ("epochs=2.5", "epochs takes an int, found '2.5'"),
    ],
)
def test_recipe_fields_are_checked_before_anything_is_written(setting, message, capsys, tmp_path):
    out = tmp_path / "run"
    one_line_error(capsys, ["train", "--recipe", "final", "--set", setting, "--out", str(out)], message)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["train", "--recipe", "final", "--seed", "99999999999999999999"],
            "argument --seed: must be from 0 to",
        ),
        (["train", "--recipe", "final", "--seed", "-1"], "argument --seed: must be from 0 to"),
        (
            ["train", "--recipe", "final", "--train-examples", "0"],
            "argument --train-examples: must be >= 1, found 0",
        ),
        (["show-augment", "--copies", "-2"], "argument --copies: must be from 1 to 100, found -2"),
        (["show-augment", "--images", "0"], "argument --images: must be from 1 to 10000, found 0"),
        (
            ["show-augment", "--degrees", "inf"],
            "argument --degrees: must be a finite number in [0, 180], found inf",
        ),
        (["bench", "--steps", "0"], "argument --steps: must be >= 1, found 0"),
        (["bench", "--warmup", "x"], "argument --warmup: takes a whole number, found 'x'"),
        (["bench", "--seeds", "0"], "argument --seeds: must be >= 2, found 0"),
    ],
)
def test_cli_numbers_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_show_augment_scale_order(capsys, tmp_path):
    one_line_error(
        capsys,
        ["show-augment", "--scale", "1.2", "0.8", "--out", str(tmp_path / "a.png")],
        "--scale MIN MAX: MIN must be <= MAX, found 1.2 > 0.8",
    )
    assert not (tmp_path / "a.png").exists()


def test_ctrl_c_exits_130_with_the_resume_command(monkeypatch, capsys, mnist_data_dir, tmp_path):
    import jax_mnist.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jax_mnist.run, "train_seeds", interrupted)
    code = main(
        [
            "train",
            "--recipe",
            "final",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "r"),
            "--data-dir",
            str(mnist_data_dir),
            "--no-download",
        ]
    )
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        f"continue with jax-mnist train --recipe final --seed 3 --out {tmp_path / 'r'} --data-dir "
        f"{mnist_data_dir} --no-download --resume"
    )


@pytest.mark.slow
def test_sigterm_exits_143_with_a_command_that_continues_the_run(mnist_data_dir, tmp_path):
    """The printed command, typed as shown, finishes the run."""
    import shlex
    import signal
    import subprocess

    out = tmp_path / "r"
    argv = jax_mnist_command(
        "train --recipe final --epochs 2 --train-examples 1000 --batch-size 128 --no-download",
        out=out,
        data_dir=mnist_data_dir,
    )
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch  1/2"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "jax-mnist train: terminated (SIGTERM); every finished epoch is checkpointed: continue with "
    )
    command = shlex.split(last.split("continue with ", 1)[1])
    assert command[0] == "jax-mnist" and command[-1] == "--resume"
    done = subprocess.run(jax_mnist_command(command[1:]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_crc_failure_says_corrupt_gzip_data(tmp_path):
    raw = bytearray(gzip.compress(b"\x00" * 100))
    raw[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: corrupt gzip data \(CRC check failed\)"):
        data_lib.read_idx(path, data_lib.LABELS_MAGIC, 10_000)


def test_offline_without_files_fails_at_once_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(
        data_lib, "_network_reachable", lambda timeout=3.0: "example.invalid unreachable: no route"
    )
    called = []
    monkeypatch.setattr(data_lib, "_tfds_download", lambda data_dir: called.append(data_dir))
    with pytest.raises(
        DataError, match="no MNIST files found and no network for tfds' download .* put the four official"
    ):
        load_mnist(tmp_path / "tfds", download=True, log=lambda s: None)
    assert called == [] and not any((tmp_path / "tfds").rglob("*.tmp*"))


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_an_unwritable_cache_is_a_note_not_a_failure(monkeypatch, mnist_data_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(mnist_data_dir, data_dir)
    (dataset_dir(data_dir) / data_lib.CACHE_NAME).unlink()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # the cache's temporary file cannot be made
    logged = []
    mnist = load_mnist(data_dir, download=False, log=logged.append)
    assert mnist.train_images.shape == (60_000, 28, 28, 1)
    assert "not cached" in logged[-1] and "Read-only file system" in logged[-1]


@pytest.mark.slow  # compiles or trains: seconds on the 2-core CPU
def test_a_corrupt_prepared_dataset_names_its_directory(mnist_data_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(mnist_data_dir, data_dir)
    (dataset_dir(data_dir) / data_lib.CACHE_NAME).unlink()
    for record in dataset_dir(data_dir).glob("mnist-test.array_record*"):
        record.write_bytes(record.read_bytes()[:100])
    with pytest.raises(
        DataError, match="the prepared mnist is unreadable .*delete that directory and run again"
    ):
        load_mnist(data_dir, download=False, log=lambda s: None)


# --------------------------------------------------------------------------- PyTorch state_dicts


@pytest.fixture(scope="module")
def model_4_state():
    import torch

    from jax_mnist.reference.torch_models import torch_model

    torch.manual_seed(0)
    return torch_model("model_4_batchnorm").state_dict()


def test_torch_files_that_are_not_state_dicts(tmp_path):
    from jax_mnist.models import load_torch_state_dict

    text, empty = tmp_path / "notes.pt", tmp_path / "empty.pt"
    text.write_text("not a checkpoint\n")
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch checkpoint"):
        load_torch_state_dict("model_4_batchnorm", text)
    with pytest.raises(CheckpointError, match="empty.pt: empty file, not a PyTorch checkpoint"):
        load_torch_state_dict("model_4_batchnorm", empty)


def test_a_pickled_module_is_refused_without_suggesting_unsafe_loading(tmp_path, model_4_state):
    import torch

    from jax_mnist.models import load_torch_state_dict
    from jax_mnist.reference.torch_models import torch_model

    path = tmp_path / "whole_model.pt"
    torch.save(torch_model("model_4_batchnorm"), path)
    with pytest.raises(CheckpointError, match="whole_model.pt: not a plain state_dict") as error:
        load_torch_state_dict("model_4_batchnorm", path)
    assert "weights_only=False" not in str(error.value)


@pytest.mark.parametrize("wrap", ["model_state_dict", "state_dict", "module_prefix"])
def test_common_wrappers_are_unwrapped(wrap, tmp_path, model_4_state):
    import torch

    from jax_mnist.models import load_torch_state_dict

    plain = load_torch_state_dict("model_4_batchnorm", model_4_state)
    if wrap == "module_prefix":
        wrapped = {f"module.{k}": v for k, v in model_4_state.items()}
    else:
        wrapped = {wrap: model_4_state, "epoch": 3}
    path = tmp_path / "wrapped.pt"
    torch.save(wrapped, path)
    loaded = load_torch_state_dict("model_4_batchnorm", path)
    np.testing.assert_array_equal(
        loaded["params"]["convblock1"]["conv"]["kernel"], plain["params"]["convblock1"]["conv"]["kernel"]
    )


def test_a_wrong_rank_tensor_names_its_key(model_4_state):
    from jax_mnist.models import load_torch_state_dict

    bad = dict(model_4_state)
    bad["convblock1.0.weight"] = bad["convblock1.0.weight"].flatten()
    with pytest.raises(
        CheckpointError, match=r"key 'convblock1.0.weight' has shape \(90,\), expected \(10, 1, 3, 3\)"
    ):
        load_torch_state_dict("model_4_batchnorm", bad)


@pytest.mark.slow  # spawns processes
def test_preparing_the_data_off_a_terminal_prints_only_our_lines(mnist_files, tmp_path):
    import subprocess

    proc = subprocess.run(
        jax_mnist_command("data", data_dir=tmp_path / "tfds", mnist_files=mnist_files),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("train (60000, 28, 28, 1)") and proc.stdout.count("\n") == 1
    assert all(line.startswith("[jax_mnist.data] ") for line in proc.stderr.splitlines()), proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr


def test_an_out_that_is_a_file_is_refused(capsys, mnist_data_dir, tmp_path):
    out = tmp_path / "file"
    out.write_text("mine")
    one_line_error(
        capsys,
        ["train", "--recipe", "final", "--out", str(out), "--data-dir", str(mnist_data_dir), "--no-download"],
        f"{out}: not a directory",
    )
    assert out.read_text() == "mine"


def test_a_study_out_that_is_a_file_is_refused(tmp_path, capsys):
    """`study --out FILE --dry-run` (or without --dry-run): one line, the file untouched."""
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    assert main(["study", "--out", str(file), "--recipes", "final", "--dry-run"]) == 2
    assert f"--out {file}: is a file, not a study directory" in capsys.readouterr().err
    assert file.read_text() == "mine\n"


def _fake_run(directory):
    """A directory that is a run's as far as the output rule goes (a config.json)."""
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "config.json").write_text("{}\n")
    return directory


# Every command that writes a file, with the argv that names its output PATH.
WRITERS = {
    "evaluate": lambda run, path: ["evaluate", str(run), "--out", str(path)],
    "export": lambda run, path: ["export", str(run), str(path), "--to", "pytorch"],
    "show-augment": lambda run, path: ["show-augment", "--out", str(path)],
    "bench": lambda run, path: ["bench", "--json", str(path), "--steps", "1"],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_writing_command_keeps_existing_files_and_runs_own(command, tmp_path, capsys):
    """An existing file is replaced only with --force; a run's own files are refused: one line,
    exit 2, before any work, the file untouched."""
    run = _fake_run(tmp_path / "run")
    suffix = {"show-augment": ".png", "export": ".pt", "bench": ".json", "evaluate": ".npz"}[command]
    existing = tmp_path / f"mine{suffix}"
    existing.write_bytes(b"a user's file")
    assert main(WRITERS[command](run, existing)) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert existing.read_bytes() == b"a user's file"
    inside = run / "checkpoints" / f"x{suffix}"
    assert main(WRITERS[command](run, inside) + ["--force"]) == 2
    assert f"is a file of the run directory {run}" in capsys.readouterr().err
    assert not inside.exists()


def test_evaluate_never_writes_its_two_files_to_one_path(tmp_path, capsys):
    """`evaluate --out x.json`: the predictions go to x.npz and the figures to x.json."""
    run = _fake_run(tmp_path / "run")
    (tmp_path / "x.npz").write_bytes(b"mine")
    assert main(["evaluate", str(run), "--out", str(tmp_path / "x.json")]) == 2
    assert f"{tmp_path / 'x.npz'}: exists" in capsys.readouterr().err


def test_the_report_refuses_a_runs_folder(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert main(["report", str(run), "--out", str(run / "checkpoints")]) == 2
    assert "is a file of the run directory" in capsys.readouterr().err
    assert list((run / "checkpoints").iterdir()) == []
