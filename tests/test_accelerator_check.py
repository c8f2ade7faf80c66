"""scripts/accelerator_check.py --quick: the accelerator check runs end to end on CPU, so it never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_quick_check_runs_every_part_and_reports_it(mnist_files, mnist_data_dir, tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "JAX_MNIST_DATA_DIR": str(mnist_data_dir)}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "accelerator_check.py"),
            "--out",
            str(out),
            "--quick",
            "--mnist-files",
            str(mnist_files),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "accelerator.json").read_text())
    assert report["mode"] == "quick" and list(report["parts"]) == ["device", "tests", "bench", "run"]
    assert not [name for name, part in report["parts"].items() if "error" in part]
    assert report["parts"]["device"]["result"]["platform"] == "cpu"
    tests = report["parts"]["tests"]["result"]
    assert tests["exit_code"] == 0 and tests["counts"]["passed"] > 0 and not tests["failed"]
    bench = report["parts"]["bench"]["result"]
    assert bench["model_8_one_seed"]["step_s"] > 0 and bench["model_8_2_seeds_vmap"]["seeds"] == 2
    assert set(bench["recipes"]) == {"model_4_batchnorm"}
    run = report["parts"]["run"]["result"]
    assert run["exit_code"] == 0 and not run["stopped_at_limit"]
    assert {seed: s["epochs_done"] for seed, s in run["seeds"].items()} == {"seed-1": 1, "seed-2": 1}
    summary = (out / "accelerator.md").read_text()
    assert "| 2 (vmap) |" in summary and "`model_4_batchnorm`" in summary and "seed-2: 1 epochs" in summary


def test_a_failing_part_is_reported_and_the_next_parts_still_run(tmp_path, monkeypatch):
    """Each part is reported on its own: one that raises leaves an error entry, not a crash."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import accelerator_check
    finally:
        sys.path.remove(str(REPO / "scripts"))
    calls = []
    monkeypatch.setattr(
        accelerator_check, "part_device", lambda: calls.append("device") or {"platform": "cpu"}
    )
    monkeypatch.setattr(
        accelerator_check, "part_tests", lambda *a: (_ for _ in ()).throw(RuntimeError("no pytest"))
    )
    monkeypatch.setattr(accelerator_check, "part_bench", lambda *a: calls.append("bench") or {})
    monkeypatch.setattr(accelerator_check, "part_run", lambda *a: calls.append("run") or {})
    monkeypatch.setattr(accelerator_check, "markdown", lambda report: "")
    assert accelerator_check.main(["--out", str(tmp_path), "--quick"]) == 1
    report = json.loads((tmp_path / "accelerator.json").read_text())
    assert report["parts"]["tests"]["error"] == "RuntimeError: no pytest" and calls == [
        "device",
        "bench",
        "run",
    ]
