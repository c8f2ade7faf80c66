# Sourced by scripts/screen_issue*.sh, which set `out`, `seed`, `args` (candidate -> train options)
# and `order`: trains each named candidate (default: all, in order) on seed $seed with the 10,000
# held-out examples as its validation split, into $out/<candidate>/seed-$seed; a started one is
# resumed, a finished one (15 epochs) skipped.
screen_candidates() {
  local name dir resume
  for name in "${@:-${order[@]}}"; do
    [[ -n "${args[$name]+x}" ]] || { echo "unknown candidate $name; known: ${order[*]}" >&2; exit 2; }
    dir="$out/$name/seed-$seed"
    resume=()
    if [[ -e "$dir/config.json" ]]; then
      [[ $(wc -l < "$dir/metrics.jsonl" 2>/dev/null || echo 0) -ge 15 ]] && { echo "$name: finished"; continue; }
      resume=(--resume)
    fi
    # shellcheck disable=SC2086
    jax-mnist train ${args[$name]} --set name="$name" --validation 10000 --seed "$seed" --out "$dir" "${resume[@]}"
  done
}
