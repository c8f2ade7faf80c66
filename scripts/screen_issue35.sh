#!/usr/bin/env bash
# The validation screening of issue 35 (docs/accuracy.md, "Under 5,000 parameters, held"): each
# candidate on seed 11, trained on 50,000 training examples and scored on the 10,000 held out
# (--validation 10000); the test set is never scored. Resumable: run it again and each candidate
# continues where it stopped; a finished one is skipped.
# Usage: scripts/screen_issue35.sh [CANDIDATE ...]   (default: all, in order)
# Data options come from $JAX_MNIST_FILES / $JAX_MNIST_DATA_DIR.
set -euo pipefail
out=${SCREENING_DIR:-results/screening-val}
seed=11

declare -A args=(
  # More updates per epoch: the batch, with the peak learning rate of the one-cycle schedule.
  [s5k_b64_lr10]="--recipe ours_5k --set batch_size=64 --set lr=0.1"
  [s5k_b32_lr05]="--recipe ours_5k --set batch_size=32 --set lr=0.05"
  [s5k_b32_lr10]="--recipe ours_5k --set batch_size=32 --set lr=0.1"
  [s5k_b128_lr20]="--recipe ours_5k --set batch_size=128 --set lr=0.2"
  [s5k_b64_lr20]="--recipe ours_5k --set batch_size=64 --set lr=0.2"
)
order=(s5k_b64_lr10 s5k_b32_lr05 s5k_b32_lr10 s5k_b128_lr20 s5k_b64_lr20)


# shellcheck source=scripts/screen_candidates.sh
. "$(dirname "$0")/screen_candidates.sh"
screen_candidates "$@"
