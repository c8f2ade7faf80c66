#!/usr/bin/env python
"""Print a table of single-seed runs (RESULTS_DIR/<run>/) from their files: the README's earlier
runs (results/) and the screening runs of docs/accuracy.md (results/screening/).

Usage: python scripts/results_table.py [RESULTS_DIR]

The study over seeds (results/study) has its own command: jax-mnist report results/study.
"""

import dataclasses
import json
import sys
from pathlib import Path

from jax_mnist.recipes import RECIPES

TARGET = 99.4
LAST = 3  # the target must hold in each of the last LAST epochs


def read_run(run: Path):
    metrics, config = run / "metrics.jsonl", run / "config.json"
    if not metrics.exists() or not config.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(config.read_text()), rows


def changed_fields(recipe: dict) -> str:
    """What the run's recipe sets differently from the registered recipe of its name (--set, --lr, ...)."""
    registered = RECIPES.get(recipe["name"])
    if registered is None:
        return "(no registered recipe of this name)"
    base = dataclasses.asdict(registered)
    return ", ".join(f"{k}={v}" for k, v in recipe.items() if base.get(k) != v) or "none"


def single_runs(results_dir: str = "results") -> None:
    print(
        "| run | recipe | changed from the recipe | seed | test accuracy per epoch (%) | last 3 epochs ≥ "
        "99.4 | best | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in sorted(Path(results_dir).iterdir()):
        found = read_run(run)
        if found is None:
            continue
        cfg, rows = found
        accuracies = [r["test_accuracy"] for r in rows]
        if len(rows) < cfg["recipe"]["epochs"]:
            held = None  # unfinished: not scored
        else:
            held = len(accuracies) >= LAST and all(a >= TARGET for a in accuracies[-LAST:])
        minutes = sum(r["epoch_seconds"] for r in rows) / 60
        print(
            f"| `{run.name}` | `{cfg['recipe']['name']}` | {changed_fields(cfg['recipe'])} | "
            f"{cfg['seed']} | {' '.join(f'{a:.2f}' for a in accuracies)} "
            f"| {'unfinished' if held is None else 'yes' if held else 'no'} | {max(accuracies):.2f} | "
            f"{minutes:.0f} min |"
        )


if __name__ == "__main__":
    single_runs(*sys.argv[1:])
