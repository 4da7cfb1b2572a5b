#!/usr/bin/env bash
# Does a change keep training bit-for-bit? Fixed-epoch CPU fp32 runs (-epochs 3 -Nit 5) of five
# settings on the real data, at two commits; their metrics.csv compared without the memory columns.
#   benchmarks/same_metrics.sh BEFORE_COMMIT [AFTER_COMMIT, default the working tree] [DATA_DIR]
set -euo pipefail
before=$1; after=${2:-}; data=${3:-../shared/data/Task04_Hippocampus}
data=$(realpath "$data"); top=$(git rev-parse --show-toplevel); work=$(mktemp -d)
git -C "$top" worktree add -q --detach "$work/before" "$before"
if [ -n "$after" ]; then git -C "$top" worktree add -q --detach "$work/after" "$after"; else ln -s "$top" "$work/after"; fi
settings=("default:" "dynunet:-architecture dynunet" "teacher:-mean_teacher True -labelled_fraction 0.5"
          "teacher_pl:-mean_teacher True -labelled_fraction 0.5 -consistency_loss pseudo_label -ema_decay 0.9"
          "weights:-class_weights auto -loss dicefocal -foreground_crops 0.5 -num_res_units 2")
differ=0
for setting in "${settings[@]}"; do
  name=${setting%%:*}; options=${setting#*:}
  for side in before after; do
    # shellcheck disable=SC2086
    (cd "$work/$side" && python main.py -data_dir "$data" -epochs 3 -Nit 5 -mixed_precision False -device cpu \
       -cache_dir "$work/cache" -best_models_dir "$work/runs/$side/$name" $options > "$work/$side-$name.log" 2>&1)
    python - "$work/runs/$side/$name/metrics.csv" > "$work/$side-$name.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
columns = [c for c in rows[0] if not c.endswith("_mb")]          # memory differs from run to run
print("\n".join(",".join(row[c] for c in columns) for row in [dict(zip(columns, columns)), *rows]))
PY
  done
  if cmp -s "$work/before-$name.csv" "$work/after-$name.csv"; then echo "$name: same metrics.csv"
  else echo "$name: DIFFERENT"; diff "$work/before-$name.csv" "$work/after-$name.csv" || true; differ=1; fi
done
git -C "$top" worktree remove --force "$work/before"
[ -n "$after" ] && git -C "$top" worktree remove --force "$work/after"
rm -rf "$work"
exit $differ
