#!/usr/bin/env bash
# The validation screening of issue 21 (docs/accuracy.md): each candidate on seed 11, trained on
# 50,000 training examples and scored on the 10,000 held out (--validation 10000); the test set is
# never scored. Resumable: run it again and each candidate continues where it stopped; a finished
# one is skipped.
# Usage: scripts/screen_issue21.sh [CANDIDATE ...]   (default: all, in order)
# Data options come from $JAX_MNIST_FILES / $JAX_MNIST_DATA_DIR.
set -euo pipefail
out=${SCREENING_DIR:-results/screening-val}
seed=11

declare -A args=(
  [s5k_base]="--recipe ours_5k"
  [s5k_pad]="--recipe ours_5k --set model=ours_5k_pad"
  [s5k_scale]="--recipe ours_5k --set scale_min=0.9 --set scale_max=1.1"
  [s5k_light]="--recipe ours_5k --set degrees=7 --set translate=0.05"
  [ref_8k_scale]="--recipe ours_8k_scale"  # a recipe that holds on the test set, for calibration
  [s4k]="--recipe ours_5k --set model=ours_4k"
  [s3k]="--recipe ours_5k --set model=ours_3k"
  [s2k]="--recipe ours_5k --set model=ours_2k"
  # Distilled from ref_8k_scale (which held out the same 10,000 examples; its checkpoints must be
  # on disk: run ref_8k_scale first)
  [s5k_kd]="--recipe ours_5k --set teacher=$out/ref_8k_scale/seed-$seed --set distill_weight=0.5"
  [s5k_kd9]="--recipe ours_5k --set teacher=$out/ref_8k_scale/seed-$seed --set distill_weight=0.9"
)
order=(s5k_base s5k_pad s5k_scale s5k_light ref_8k_scale s4k s3k s2k s5k_kd s5k_kd9)


# shellcheck source=scripts/screen_candidates.sh
. "$(dirname "$0")/screen_candidates.sh"
screen_candidates "$@"
