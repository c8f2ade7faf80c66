#!/usr/bin/env python
"""Print the README's results tables from run directories (nothing typed in by hand).

Usage: python scripts/results_table.py [RESULTS_DIR]           single runs: RESULTS_DIR/<run>/
       python scripts/results_table.py --study [STUDY_DIR]     seeds: STUDY_DIR/<recipe>/seed-<s>/
"""

import json
import statistics
import sys
from pathlib import Path

TARGET = 99.4
LAST = 3  # the target must hold in each of the last LAST epochs


def read_run(run: Path):
    metrics, config = run / "metrics.jsonl", run / "config.json"
    if not metrics.exists() or not config.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(config.read_text()), rows


def single_runs(results_dir: str = "results") -> None:
    print("| run | recipe | seed | test accuracy per epoch (%) | last 3 epochs ≥ 99.4 | best | wall time |")
    print("|---|---|---|---|---|---|---|")
    for run in sorted(Path(results_dir).iterdir()):
        found = read_run(run)
        if found is None:
            continue
        cfg, rows = found
        accuracies = [r["test_accuracy"] for r in rows]
        held = len(accuracies) >= LAST and all(a >= TARGET for a in accuracies[-LAST:])
        minutes = sum(r["epoch_seconds"] for r in rows) / 60
        print(f"| `{run.name}` | `{cfg['recipe']['name']}` | {cfg['seed']} | {' '.join(f'{a:.2f}' for a in accuracies)} "
              f"| {'yes' if held else 'no'} | {max(accuracies):.2f} | {minutes:.0f} min |")


def study(study_dir: str = "results/study") -> None:
    """One row per recipe over its finished seeds; unfinished seeds are counted, never scored."""
    print(f"| recipe | model | epochs | seeds finished | last-epoch test accuracy: mean ± std (min) "
          f"| per-seed min over the last {LAST} epochs | seeds ≥ {TARGET} in each of the last {LAST} | best (mean) "
          "| median seconds per epoch (all seeds together) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe_dir in sorted(p for p in Path(study_dir).iterdir() if p.is_dir()):
        runs = [read_run(d) for d in sorted(recipe_dir.glob("seed-*"), key=lambda d: int(d.name.split("-")[1]))]
        runs = [r for r in runs if r is not None]
        if not runs:
            continue
        epochs = runs[0][0]["recipe"]["epochs"]
        done = [(cfg, rows) for cfg, rows in runs if len(rows) == epochs]
        started = f"{len(done)}" + (f" ({len(runs) - len(done)} unfinished)" if len(done) < len(runs) else "")
        if not done:
            print(f"| `{recipe_dir.name}` | `{runs[0][0]['recipe']['model']}` | {epochs} | {started} | | | | | |")
            continue
        last = [rows[-1]["test_accuracy"] for _, rows in done]
        window = [min(r["test_accuracy"] for r in rows[-LAST:]) for _, rows in done]
        seeds = [cfg["seed"] for cfg, _ in done]
        spread = statistics.stdev(last) if len(last) > 1 else 0.0
        held = sum(m >= TARGET for m in window)
        best = statistics.mean(max(r["test_accuracy"] for r in rows) for _, rows in done)
        seconds = statistics.median(r["epoch_seconds"] for _, rows in done for r in rows)
        per_seed = ", ".join(f"{m:.2f} (seed {s})" for m, s in zip(window, seeds))
        print(f"| `{recipe_dir.name}` | `{done[0][0]['recipe']['model']}` | {epochs} | {started} "
              f"| {statistics.mean(last):.2f} ± {spread:.2f} ({min(last):.2f}) | {per_seed} | {held}/{len(done)} "
              f"| {best:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--study"]:
        study(*sys.argv[2:])
    else:
        single_runs(*sys.argv[1:])
