#!/usr/bin/env bash
# The selection sweep (benchmarks/selection_sweep.py) on a lent GPU, in float32 like the CPU
# runs. What to carry: benchmarks/gpu_setup.sh, plus
#   .gpu/   dev mixes (benchmarks/dev_mixes.py), the SST-2 mixes and the safe set
# and writes the sweep's JSONL and logs under $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}
source "${GPU_SETUP:-benchmarks/gpu_setup.sh}"  # a test sources a stand-in without a GPU
gpu_setup "$OUT" || exit 1
sweep() {  # budget-seconds, variants, then file arguments
  local budget=$1 variants=$2; shift 2
  python3 benchmarks/selection_sweep.py --model Qwen/Qwen2.5-Coder-0.5B-Instruct --safe-data .gpu/safetyllamas_safety_only.json \
    --results "$OUT/sweep.jsonl" --work-dir /tmp/sweep --budget-seconds "$budget" \
    --variants "$variants" "$@" 2>>"$OUT/sweep.log" | grep -v "^{" | tee -a "$OUT/tables.md"
}
DEV=(.gpu/dev/*.jsonl); SST2=(.gpu/sst2_n1000_p0.05.json .gpu/sst2_n1000_p0.1.json .gpu/sst2_n1000_p0.2.json)
sweep ${B1:-170} default,visits --mixes "${DEV[@]}" --sst2 "${SST2[@]}" --seeds 0 1 2
sweep ${B2:-90} paper-budget,visits-paper-budget --mixes "${DEV[@]}"
sweep ${B3:-90} margin-4-tokens,loss-8-tokens,loss-shift-8-tokens,strong-safety-pull --mixes .gpu/dev/*_s0.jsonl
