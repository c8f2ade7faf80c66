import subprocess

import pytest

from jax_mnist.cli import main
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
