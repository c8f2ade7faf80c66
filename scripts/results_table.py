#!/usr/bin/env python
"""Print the README's results table from results/*/metrics.jsonl (nothing typed in by hand).

Usage: python scripts/results_table.py [RESULTS_DIR]
"""

import json
import sys
from pathlib import Path

TARGET = 99.4


def main(results_dir: str = "results") -> None:
    print("| run | recipe | seed | test accuracy per epoch (%) | last 3 epochs ≥ 99.4 | best | wall time |")
    print("|---|---|---|---|---|---|---|")
    for run in sorted(Path(results_dir).iterdir()):
        metrics, config = run / "metrics.jsonl", run / "config.json"
        if not metrics.exists() or not config.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        cfg = json.loads(config.read_text())
        accuracies = [r["test_accuracy"] for r in rows]
        held = len(accuracies) >= 3 and all(a >= TARGET for a in accuracies[-3:])
        minutes = sum(r["epoch_seconds"] for r in rows) / 60
        print(f"| `{run.name}` | `{cfg['recipe']['name']}` | {cfg['seed']} | {' '.join(f'{a:.2f}' for a in accuracies)} "
              f"| {'yes' if held else 'no'} | {max(accuracies):.2f} | {minutes:.0f} min |")


if __name__ == "__main__":
    main(*sys.argv[1:])
