#!/usr/bin/env bash
# The searches of issue 35 after the batch screening (scripts/screen_issue35.sh), each a
# `jax-mnist search` on the validation split (seed 11, --validation 10000; the test set is never
# scored) into results/search-issue35/<stage>/. Resumable: run it again and each search continues
# where it stopped (a finished one trains nothing).
# Usage: scripts/search_issue35.sh [STAGE ...]   (default: all, in order)
# Data options come from $JAX_MNIST_FILES / $JAX_MNIST_DATA_DIR.
set -euo pipefail
root=${SEARCH_DIR:-results/search-issue35}
# The batch screening's choice: batch 64 at a peak of 0.1 (the best lowest-of-the-last-3 validation
# accuracy of batch 32/64/128/256 with their learning rates).
b64=(--recipe ours_5k --set batch_size=64 --set lr=0.1)

declare -A stages=(
  # Weight averaging, and augmentation off for the last 3 epochs, with it.
  [5k-ema]="${b64[*]} --space ema=0.999 --space augment_off_epochs=0,3"
  # Other layouts at the budget, with 5k-ema's choice (ema 0.999, augmentation off for the last 3).
  [5k-layout]="${b64[*]} --set ema=0.999 --set augment_off_epochs=3 --space model=pyramid_5k,pyramid2_5k"
)
order=(5k-ema 5k-layout)

for stage in "${@:-${order[@]}}"; do
  [[ -n "${stages[$stage]+x}" ]] || { echo "unknown stage $stage; known: ${order[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086
  jax-mnist search ${stages[$stage]} --validation 10000 --seed 11 --out "$root/$stage"
done
