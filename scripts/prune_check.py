"""Does `jax-mnist search --prune` save time without dropping the best trial? One measured case.

Runs the same small grid twice (ours_2k; 8 trials: lr x batch size; 6 epochs on 5,000 training
examples, scored on the 10,000-example validation split), without and with --prune, into
OUT/plain and OUT/pruned, and prints each search's wall time, how many trials were pruned, and
its best trial. Resumable as the searches are (a finished one trains nothing; its time is then
the time of the check, not of the search).

Usage: python scripts/prune_check.py OUT
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

SEARCH = (
    "search --recipe ours_2k --space lr=0.01,0.03,0.1,0.3 --space batch_size=128,512 "
    "--epochs 6 --train-examples 5000 --validation 10000"
)


def main() -> None:
    out = Path(sys.argv[1])
    for name, extra in (("plain", []), ("pruned", ["--prune"])):
        started = time.perf_counter()
        command = ["jax-mnist", *SEARCH.split(), *extra, "--out", str(out / name)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        storage = JournalStorage(JournalFileBackend(str(out / name / "optuna-journal.log")))
        study = optuna.load_study(study_name="search", storage=storage)
        pruned = [t.number for t in study.trials if t.state.name == "PRUNED"]
        best = study.best_trial
        print(
            f"{name}: {seconds:.0f} s, {len(study.trials)} trials, pruned {pruned}; best trial "
            f"{best.number} {best.params} scored {best.value:.2f}"
        )


if __name__ == "__main__":
    main()
