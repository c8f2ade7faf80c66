#!/usr/bin/env python
"""Check a GPU/TPU machine and measure the study's speed there, in one command.

    python scripts/accelerator_check.py --out DIR [--mnist-files D] [--wheels W] [--quick]

On whatever device JAX finds, four parts, each under its own time limit and each reported even
when a later one fails (``DIR/accelerator.json`` is rewritten after every part, and
``DIR/accelerator.md`` summarises it):

1. ``device``: the device and versions (JAX, jaxlib, the CUDA/TPU plugin, device kind, memory);
2. ``tests``: the device-code tests (models, engine, multi-seed, export, dropout, augmentation)
   with ``-m "not slow"``, their counts and the time they took;
3. ``bench``: the program training runs (``run.train_epoch``: the epoch-chunk loop) for model 8
   at batch 256, timed per step for 1 seed and for K seeds stacked with ``vmap`` (throughput per
   seed, the K-seeds/1-seed ratio, peak device memory), then every recipe's step time;
4. ``run``: ``jax-mnist train --recipe final_onecycle --seeds 1-5`` (15 epochs) with its wall
   time and the seeds' test accuracies; stopped by SIGTERM at its time limit, it reports the epochs
   done (the ``metrics.jsonl`` files stay in ``DIR/run``).

``--quick`` runs the same parts on tiny sizes (CPU, CI); ``--wheels W`` first installs the
wheels of ``scripts/accelerator_wheels.sh W`` with ``pip install --no-index``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_TESTS = [
    "tests/test_models.py",
    "tests/test_engine.py",
    "tests/test_multi_seed.py",
    "tests/test_inference.py",
    "tests/test_dropout.py",
    "tests/test_augment.py",
]

# Sizes and limits (seconds) of each part: a full check fits in 8 minutes on one datacenter GPU.
FULL = {
    "tests": DEVICE_TESTS,
    "tests_limit": 150,
    "batch": 256,
    "steps": 40,
    "seeds": 8,
    "recipe_steps": 20,
    "bench_limit": 120,
    "run_args": ["--seeds", "1-5"],
    "run_limit": 180,
}
QUICK = {
    "tests": ["tests/test_streams.py"],
    "tests_limit": 120,
    "batch": 32,
    "steps": 2,
    "seeds": 2,
    "repeats": 1,
    "recipe_steps": 2,
    "recipes": ["model_4_batchnorm"],
    "bench_limit": 120,
    "run_args": ["--seeds", "1-2", "--epochs", "1", "--train-examples", "512", "--batch-size", "128"],
    "run_limit": 240,
}


def part_device() -> dict:
    import importlib.metadata as metadata

    import jax

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    plugins = {
        d.metadata["Name"]: d.version
        for d in metadata.distributions()
        if re.match(r"(jax[-_]cuda\d+[-_](plugin|pjrt)|libtpu|jax[-_]rocm)", d.metadata["Name"] or "")
    }
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "plugins": plugins,
        "flax": version("flax"),
        "optax": version("optax"),
        "orbax-checkpoint": version("orbax-checkpoint"),
        "tensorflow-datasets": version("tensorflow-datasets"),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "memory_bytes": stats.get("bytes_limit"),
    }


def part_tests(sizes: dict, mnist_files: str | None, limit: float) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if mnist_files:
        env["JAX_MNIST_TEST_FILES"] = str(Path(mnist_files).resolve())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *sizes["tests"]]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output, code = (
            (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""),
            None,
        )
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", output)
    }
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    return {
        "command": " ".join(cmd[1:]),
        "exit_code": code,
        "timed_out": code is None,
        "counts": counts,
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 1),
        "tail": output.strip().splitlines()[-3:],
    }


def _per_step(recipe, seeds: list[int], steps: int, repeats: int = 3) -> dict:
    """Seconds per optimizer step of ``run.train_epoch`` (what training runs) over ``steps``
    full batches, after a first epoch that compiles; the median of ``repeats`` epochs."""
    import jax
    import numpy as np

    from jax_mnist.engine import ProgramConfig, programs_for
    from jax_mnist.run import train_epoch

    n = steps * recipe.batch_size
    programs = programs_for(ProgramConfig(recipe, n, len(seeds)))
    rng = np.random.default_rng(0)
    train_set = programs.place_data(
        (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, (n,), dtype=np.int32))
    )
    times = []
    for epoch in range(repeats + 1):
        states, keys = programs.init_seeds(seeds)
        jax.block_until_ready(states)
        started = time.perf_counter()
        states, _ = train_epoch(programs, states, train_set, keys, epoch)  # the metrics read waits for it
        jax.block_until_ready(states)
        times.append(time.perf_counter() - started)
    per_step = statistics.median(times[1:]) / steps
    return {
        "compile_and_first_epoch_s": round(times[0], 3),
        "step_s": per_step,
        "images_per_s_per_seed": recipe.batch_size / per_step,
        "steps": steps,
        "seeds": len(seeds),
    }


def _peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def part_bench(sizes: dict, limit: float, record) -> dict:
    from jax_mnist.recipes import RECIPE_NAMES, get_recipe, with_overrides

    started = time.perf_counter()
    result: dict = {"batch_size": sizes["batch"], "program": "run.train_epoch (epoch-chunk loop)"}
    recipe = with_overrides(get_recipe("final"), {"batch_size": sizes["batch"], "seed_axis": "vmap"})
    repeats = sizes.get("repeats", 3)
    result["model_8_one_seed"] = _per_step(recipe, [1], sizes["steps"], repeats)
    k = sizes["seeds"]
    result[f"model_8_{k}_seeds_vmap"] = _per_step(recipe, list(range(1, k + 1)), sizes["steps"], repeats)
    one, many = result["model_8_one_seed"], result[f"model_8_{k}_seeds_vmap"]
    result["seeds_vs_one_step_time_ratio"] = many["step_s"] / one["step_s"]
    result["seeds_throughput_gain"] = k * one["step_s"] / many["step_s"]
    result["peak_device_bytes"] = _peak_bytes()
    record(result)
    result["recipes"], result["recipes_not_timed"] = {}, []
    for name in sizes.get("recipes", RECIPE_NAMES):
        if time.perf_counter() - started > limit:
            result["recipes_not_timed"].append(name)  # this part's time is spent
            continue
        r = with_overrides(get_recipe(name), {"batch_size": sizes["batch"]})
        timed = _per_step(r, [1], sizes["recipe_steps"], min(repeats, 2))
        result["recipes"][name] = {
            "model": r.model,
            "step_ms": 1000 * timed["step_s"],
            "compile_and_first_epoch_s": timed["compile_and_first_epoch_s"],
        }
        record(result)
    return result


def part_run(sizes: dict, out: Path, mnist_files: str | None, limit: float) -> dict:
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "jax_mnist", "train", "--recipe", "final_onecycle", *sizes["run_args"]]
    cmd += ["--out", str(run_dir), "--no-download"]
    if not os.environ.get("JAX_MNIST_DATA_DIR"):  # prepared once, beside the check's own files
        cmd += ["--data-dir", str(out / "tfds")]
    if mnist_files:
        cmd += ["--mnist-files", str(Path(mnist_files).resolve())]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=limit)
        stopped = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # jax-mnist stops cleanly: every finished epoch is kept
        output, _ = proc.communicate(timeout=120)
        stopped = True
    seconds = time.perf_counter() - started
    seeds = {}
    for metrics in sorted(run_dir.glob("seed-*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        seeds[metrics.parent.name] = {
            "epochs_done": len(rows),
            "test_accuracy": [r["test_accuracy"] for r in rows],
            "epoch_seconds": [r["epoch_seconds"] for r in rows],
        }
    return {
        "command": " ".join(["jax-mnist", *cmd[3:]]),
        "exit_code": proc.returncode,
        "stopped_at_limit": stopped,
        "wall_s": round(seconds, 1),
        "seeds": seeds,
        "tail": output.strip().splitlines()[-3:],
    }


def markdown(report: dict) -> str:
    lines = [
        "# Accelerator check",
        "",
        f"Made by `python scripts/accelerator_check.py` ({report['mode']}).",
        "",
    ]
    device = report["parts"].get("device", {})
    if "result" in device:
        d = device["result"]
        memory = f"{d['memory_bytes'] / 2**30:.0f} GiB" if d.get("memory_bytes") else "?"
        lines += [
            f"- device: {d['device_count']} x {d['device_kind']} ({d['platform']}, {memory}); jax "
            f"{d['jax']}, "
            f"jaxlib {d['jaxlib']}, plugins {d['plugins'] or 'none'}"
        ]
    for name in ("device", "tests", "bench", "run"):
        part = report["parts"].get(name)
        if part is None:
            lines.append(f"- {name}: not run")
        elif "error" in part:
            lines.append(f"- {name}: failed after {part['seconds']} s: {part['error']}")
    tests = report["parts"].get("tests", {}).get("result")
    if tests:
        lines.append(
            f"- tests: {tests['counts']} in {tests['seconds']} s (exit {tests['exit_code']})"
            + (f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else "")
        )
    bench = report["parts"].get("bench", {}).get("result")
    if bench:
        one = bench["model_8_one_seed"]
        k = next(key for key in bench if key.endswith("_seeds_vmap"))
        lines += [
            "",
            f"Model 8, batch {bench['batch_size']}, {bench['program']}:",
            "",
            "| seeds | ms per step | images/s per seed |",
            "|---|---:|---:|",
            f"| 1 | {1000 * one['step_s']:.2f} | {one['images_per_s_per_seed']:,.0f} |",
            f"| {bench[k]['seeds']} (vmap) | {1000 * bench[k]['step_s']:.2f} | "
            f"{bench[k]['images_per_s_per_seed']:,.0f} |",
            "",
            f"K seeds cost {bench['seeds_vs_one_step_time_ratio']:.2f}x one seed's step time "
            f"({bench['seeds_throughput_gain']:.1f}x the throughput); peak device memory "
            f"{bench['peak_device_bytes'] or 'n/a'} bytes.",
            "",
            "| recipe | model | ms per step |",
            "|---|---|---:|",
        ]
        lines += [
            f"| `{n}` | `{r['model']}` | {r['step_ms']:.2f} |" for n, r in bench.get("recipes", {}).items()
        ]
        if bench.get("recipes_not_timed"):
            lines.append(
                f"\nNot timed (the part's time limit was spent): {', '.join(bench['recipes_not_timed'])}"
            )
    run = report["parts"].get("run", {}).get("result")
    if run:
        lines += [
            "",
            f"`{run['command']}`: {run['wall_s']} s wall"
            + (" (stopped at its time limit)" if run["stopped_at_limit"] else "")
            + ":",
            "",
        ]
        lines += [
            f"- {seed}: {s['epochs_done']} epochs, test accuracy "
            f"{s['test_accuracy'][-1] if s['test_accuracy'] else '-'}"
            for seed, s in run["seeds"].items()
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, help="directory for accelerator.json, accelerator.md and the run"
    )
    parser.add_argument("--mnist-files", help="the four official MNIST .gz files (default $JAX_MNIST_FILES)")
    parser.add_argument(
        "--wheels", help="install the wheels in this directory first (pip install --no-index)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CPU and CI")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mnist_files = args.mnist_files or os.environ.get("JAX_MNIST_FILES")
    if args.wheels:
        wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels], check=True
        )
    sys.path.insert(0, str(REPO))
    from jax_mnist import host_memory

    host_memory.apply_from_env()
    sizes = QUICK if args.quick else FULL
    report: dict = {"mode": "quick" if args.quick else "full", "parts": {}}

    def write() -> None:
        (out / "accelerator.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "accelerator.md").write_text(markdown(report))

    def part(name: str, fn) -> None:
        started = time.perf_counter()
        print(f"[accelerator_check] {name} ...", flush=True)
        report["parts"][name] = {"running": True}

        def record(partial: dict) -> None:  # what a long part has measured so far
            report["parts"][name] = {"result": partial, "seconds": round(time.perf_counter() - started, 1)}
            write()

        try:
            result = fn(record) if fn.__code__.co_argcount else fn()
            report["parts"][name] = {"result": result, "seconds": round(time.perf_counter() - started, 1)}
        except Exception as e:  # noqa: BLE001  (a failing part is reported; the next one still runs)
            report["parts"][name] = {
                **report["parts"].get(name, {}),
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc().splitlines()[-6:],
                "seconds": round(time.perf_counter() - started, 1),
            }
        report["parts"][name].pop("running", None)
        write()
        print(
            f"[accelerator_check] {name}: {'error' if 'error' in report['parts'][name] else 'done'} in "
            f"{report['parts'][name]['seconds']} s",
            flush=True,
        )

    part("device", part_device)
    part("tests", lambda: part_tests(sizes, mnist_files, sizes["tests_limit"]))
    part("bench", lambda record: part_bench(sizes, sizes["bench_limit"], record))
    part("run", lambda: part_run(sizes, out, mnist_files, sizes["run_limit"]))
    print(f"wrote {out / 'accelerator.json'} and {out / 'accelerator.md'}")
    failed = [name for name, p in report["parts"].items() if "error" in p]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
