#!/usr/bin/env bash
# One seed of the gentle regime's core cells (docs/baselines.md#gentle-regime and
# #gentle-regime-seven-seeds): all data (with the base model at step 0), the oracle, SEAL and
# SEAL + SafeInstr, then XSTest over-refusal and the held-out task answers' loss and token
# accuracy of all four. Every step resumes, so rerun the same line after a stop. The regime's
# settings are in gentle_regime.sh.
#
#   bash benchmarks/gentle_core_cells.sh 7                 # -> runs/gentle/lr1e-4-s7-{all,oracle,seal,...}
#   BENIGN_DATA=../shared/data/benign/alpaca_en_demo.json \
#       bash benchmarks/gentle_core_cells.sh 0 runs/gentle-alpaca   # another benign file, its own root
#
# One thread per run: two seeds side by side fill a 2-core machine (each fine-tuning process
# peaks near 12 GB; a third does not fit in 24 GB).
set -euo pipefail
S=${1:?usage: gentle_core_cells.sh SEED [OUTPUT_ROOT]}
G=${2:-runs/gentle}
source "$(dirname "$0")/gentle_regime.sh"

ec --eval-steps 0,12 --output-dir "$G/lr1e-4-s$S-all"
ec --oracle --eval-steps 8 --output-dir "$G/lr1e-4-s$S-oracle"
# sealft select refuses to overwrite a finished selection, so a rerun skips it
[ -f "$G/s$S-select/summary.json" ] || sealft select --finetune-data "$G/lr1e-4-s$S-all/train.json" \
    --output-dir "$G/s$S-select" --safe-data $SAFE --model "$MODEL" seed="$S" epochs=1 batch_size=16 \
    safe_batch_size=16 micro_batch_size=8 lr=1e-4 selector_lr=5e-3 gamma_start=0.05 \
    max_length=256 safe_sample=200 keep_ratio=0.667 label_field=flag
ec --keep-scores "$G/s$S-select/scores.jsonl" --eval-steps 8 --output-dir "$G/lr1e-4-s$S-seal"
ec --keep-scores "$G/s$S-select/scores.jsonl" --safeinstr-k 10 --safe-data $SAFE --eval-steps "" \
    --output-dir "$G/lr1e-4-s$S-seal-safeinstr"

task_rows "$G"
overrefusal "$G" --cell all="$G/lr1e-4-s{seed}-all" --cell oracle="$G/lr1e-4-s{seed}-oracle" \
    --cell seal="$G/lr1e-4-s{seed}-seal" --cell seal+safeinstr="$G/lr1e-4-s{seed}-seal-safeinstr"
echo "gentle core cells, seed $S: done"
