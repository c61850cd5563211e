#!/usr/bin/env bash
# Seeds of the gentle regime's core cells (benchmarks/gentle_core_cells.sh) side by side on one
# lent GPU, float32 like the CPU runs. What to carry: benchmarks/gpu_setup.sh, plus
#   .gpu/task.json   the held-out task answers the CPU seeds were scored on (same rows; TASK
#                    names another file)
# and writes OUT/gentle.tgz: every seed's JSON, JSONL, YAML and log files (no weights).
#
#   SEEDS="0 3 4" BENIGN_DATA=../shared/data/benign/alpaca_en_demo.json DEADLINE=420 \
#       OUT=$OUT bash benchmarks/gpu_gentle.sh
#
# Seeds still running at DEADLINE seconds are stopped; rerun on the warm machine to resume them
# (every step of gentle_core_cells.sh resumes).
set -uo pipefail
OUT=${OUT:-gpu_out}; ROOT=${ROOT:-/tmp/gentle}; DEADLINE=${DEADLINE:-420}
SEEDS=${SEEDS:?set SEEDS, e.g. SEEDS="0 3 4"}
mkdir -p "$ROOT"
source "${GPU_SETUP:-benchmarks/gpu_setup.sh}"  # a test sources a stand-in without a GPU
source "$(dirname "$0")/gpu_archive.sh"
gpu_setup "$OUT" || exit 1
[ -f "$ROOT/task.json" ] || cp "${TASK:-.gpu/task.json}" "$ROOT/task.json"
start=$SECONDS
pids=()
for s in $SEEDS; do
  # a process group of its own, so that the deadline stops this seed's steps and nothing else
  setsid bash benchmarks/gentle_core_cells.sh "$s" "$ROOT" >> "$ROOT/core-s$s.log" 2>&1 &
  pids+=($!)
done
running() { local p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running && ((SECONDS - start < DEADLINE)); do sleep 2; done
for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null; done
sleep 1
grep -h "gentle core cells, seed .*: done" "$ROOT"/core-s*.log | tee "$OUT/done.txt"
gpu_archive "$ROOT" "$OUT/gentle.tgz" json jsonl yaml log md
