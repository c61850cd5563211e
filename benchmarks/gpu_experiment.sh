#!/usr/bin/env bash
# A `sealft experiment` grid on one lent GPU: one part per seed side by side, as a grid split
# across machines (sealft/experiment.py), for the CPU checkout to merge. Every part lists all
# seeds, its own first, because the held-out rows lie outside every listed seed's sample; a part
# is stopped as soon as it starts a cell of another seed, and every part at DEADLINE seconds.
# What to carry: benchmarks/gpu_setup.sh, plus the config's finetune_data where it is an
# ignored path (runs/...). Writes OUT/parts.tgz: each part's config.yaml, inputs.json,
# results.csv/md, log, and its cells' JSON, JSONL and YAML files (no weights). Then, here:
#
#   CONFIG=configs/experiment_alpaca_gentle.yaml SEEDS="0 1 2" DEADLINE=480 OUT=$OUT \
#       bash benchmarks/gpu_experiment.sh                                   # on the GPU
#   tar xzf parts.tgz -C runs/gpu-parts
#   sealft experiment --config configs/experiment_alpaca_gentle.yaml \
#       merge_dirs=runs/gpu-parts/part-s0,runs/gpu-parts/part-s1,runs/gpu-parts/part-s2
set -uo pipefail
OUT=${OUT:-gpu_out}; ROOT=${ROOT:-/tmp/experiment}; DEADLINE=${DEADLINE:-480}
CONFIG=${CONFIG:?set CONFIG, e.g. configs/experiment_alpaca_gentle.yaml}
SEEDS=${SEEDS:?set SEEDS, e.g. SEEDS="0 1 2"}
source "${GPU_SETUP:-benchmarks/gpu_setup.sh}"  # a test sources a stand-in without a GPU
source "$(dirname "$0")/gpu_archive.sh"
gpu_setup "$OUT" || exit 1
mkdir -p "$ROOT"
start=$SECONDS
declare -A part
for s in $SEEDS; do
  order=$(printf '%s\n' $s $SEEDS | awk '!seen[$0]++' | paste -sd,)
  # a process group of its own, so that stopping a part stops its workers too
  OMP_NUM_THREADS=4 setsid sealft experiment --config "$CONFIG" "seeds=$order" plot=false ${OVERRIDES:-} \
    --output-dir "$ROOT/part-s$s" > "$ROOT/part-s$s.log" 2>&1 &
  part[$s]=$!
done
while ((${#part[@]})) && ((SECONDS - start < DEADLINE)); do
  sleep 2
  for s in "${!part[@]}"; do
    other=$(find "$ROOT/part-s$s/cells" -maxdepth 1 -name '*-seed*' ! -name "*-seed$s" 2>/dev/null)
    if [ -n "$other" ] || ! kill -0 "${part[$s]}" 2>/dev/null; then
      kill -- -"${part[$s]}" 2>/dev/null
      echo "part s$s stopped after $((SECONDS - start)) s"
      unset "part[$s]"
    fi
  done
done
for s in "${!part[@]}"; do kill -- -"${part[$s]}" 2>/dev/null; echo "part s$s: DEADLINE"; done
sleep 2
grep -h "cells finished\|finished in\|failed" "$ROOT"/part-s*.log | tail -n 20
gpu_archive "$ROOT" "$OUT/parts.tgz" json jsonl yaml csv md log
