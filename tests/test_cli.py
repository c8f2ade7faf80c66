import subprocess
import sys

from jax_mnist.cli import main


def test_summary_command_prints_table(capsys):
    assert main(["summary", "model_7_max_capacity"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 7,914" in out
    assert "convblock7" in out and "(N, 2, 2, 12)" in out


def test_summary_unknown_model_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "jax_mnist", "summary", "model_9"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'model_9'" in proc.stderr
    assert "Traceback" not in proc.stderr
