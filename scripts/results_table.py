#!/usr/bin/env python
"""Print the README's table of the earlier single-seed runs (RESULTS_DIR/<run>/), from their files.

Usage: python scripts/results_table.py [RESULTS_DIR]

The study over seeds (results/study) has its own command: jax-mnist report results/study.
"""

import json
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


if __name__ == "__main__":
    single_runs(*sys.argv[1:])
