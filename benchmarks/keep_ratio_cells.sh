#!/usr/bin/env bash
# One seed of a data filter at another cut of the gentle regime's mix (gentle_core_cells.sh):
#   METHOD=seal (default)  the SEAL selection that gentle_core_cells.sh already fitted, its
#                          weights cut at the top KEEP_RATIO (default 0.5) instead of its own 2/3;
#                          no selection is refitted, so the cut is the only change;
#   METHOD=seal+safeinstr  the same cut plus SafeInstr's 10 safety rows, as the core cells add them;
#   METHOD=random          the control: a seeded random selection keeping the same share.
# Each is fine-tuned and evaluated as the core cells are (held-out refusal at the end of the
# epoch, then XSTest and the held-out task answers). Every step resumes: rerun the same line.
#
#   bash benchmarks/keep_ratio_cells.sh 0 docs/results/erosion-gentle-alpaca runs/keep-alpaca \
#       ../shared/data/benign/alpaca_en_demo.json
#   METHOD=random bash benchmarks/keep_ratio_cells.sh 0 docs/results/erosion-gentle runs/keep-gpt4
#
# SELECTED (2nd argument) holds s{SEED}-select/scores.jsonl and lr1e-4-s{SEED}-all (whose
# step-0 XSTest evaluation stands for the base model, so it is not redone); nothing is written
# there. One thread per run: two seeds side by side fill a 2-core machine.
set -euo pipefail
S=${1:?usage: keep_ratio_cells.sh SEED SELECTED OUTPUT_ROOT [BENIGN_DATA]}
SEL=${2:?usage: keep_ratio_cells.sh SEED SELECTED OUTPUT_ROOT [BENIGN_DATA]}
G=${3:?usage: keep_ratio_cells.sh SEED SELECTED OUTPUT_ROOT [BENIGN_DATA]}
BENIGN_DATA=${4:-${BENIGN_DATA:-}}
RATIO=${KEEP_RATIO:-0.5}
METHOD=${METHOD:-seal}
source "$(dirname "$0")/gentle_regime.sh"
CELL="$METHOD-keep$RATIO"
NAME=${CELL/+/-}  # a folder name without '+', like the core cells' seal-safeinstr
OUT="$G/lr1e-4-s$S-$NAME"

case $METHOD in
  seal) ec --keep-scores "$SEL/s$S-select/scores.jsonl" --keep-ratio "$RATIO" --eval-steps "" \
      --output-dir "$OUT" ;;
  seal+safeinstr) ec --keep-scores "$SEL/s$S-select/scores.jsonl" --keep-ratio "$RATIO" \
      --safeinstr-k 10 --safe-data "$SAFE" --eval-steps "" --output-dir "$OUT" ;;
  random)
    ec --data-only --output-dir "$OUT"  # the seed's mix, for the random selection to run on
    # sealft select refuses to overwrite a finished selection, so a rerun skips it
    [ -f "$G/s$S-$CELL-select/summary.json" ] || sealft select --method random \
        --finetune-data "$OUT/train.json" --output-dir "$G/s$S-$CELL-select" seed="$S" \
        keep_ratio="$RATIO" max_length=256 label_field=flag
    ec --keep-scores "$G/s$S-$CELL-select/scores.jsonl" --eval-steps "" --output-dir "$OUT" ;;
  *) echo "keep_ratio_cells.sh: METHOD=$METHOD: use seal, seal+safeinstr or random" >&2; exit 2 ;;
esac
task_rows "$G"
# the base model's XSTest run is read from SELECTED's all-data folders (any seed's), never redone there
overrefusal "$G" --base "$SEL/lr1e-4-s{seed}-all" --cell "$CELL=$G/lr1e-4-s{seed}-$NAME"
echo "keep-ratio cell $CELL, seed $S: done"
