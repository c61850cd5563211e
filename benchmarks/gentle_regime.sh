# The gentle regime of issue 12 (docs/baselines.md#gentle-regime), sourced by the scripts that
# run its cells so that they cannot drift apart: seed S's mix of 96 rows (32 BeaverTails harmful
# answers, the rest answers from BENIGN_DATA), LoRA r16 at lr 1e-4 for one epoch, max_length
# 256, one thread per run. Set S (and BENIGN_DATA, MODEL if not the defaults) before sourcing.
# FINETUNE_DATA, a file with a `flag` column (benchmarks/dev_mixes.py writes one), replaces both
# sources: the mix's harmful and benign rows, its held-out questions and answers all come from it.
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
BEN=${BENIGN_DATA:-../shared/data/benign/alpaca_eval_gpt4_outputs.json}
SAFE=../shared/data/safe/safetyllamas_safety_only.json
MODEL=${MODEL:-Qwen/Qwen2.5-Coder-0.5B-Instruct}
if [ -n "${FINETUNE_DATA:-}" ]; then SOURCE=(--finetune-data "$FINETUNE_DATA")
else SOURCE=(--benign-data "$BEN"); fi

# fine-tune (and evaluate) one cell of seed S; the caller adds the cell's own flags
ec() { python benchmarks/erosion_curve.py --threads 1 --epochs 1 --seed "$S" "${SOURCE[@]}" \
    --model "$MODEL" --rows 96 --harmful 32 --lr 1e-4 --max-length 256 --sst2 0 "$@"; }

# the 40 held-out benign answers that no mix of seeds 0-2 trains on (one file for every seed)
task_rows() { [ -f "$1/task.json" ] || python benchmarks/heldout_task_rows.py "${SOURCE[@]}" \
    --rows 96 --harmful 32 --n 40 --out "$1/task.json"; }

# XSTest over-refusal and the held-out task answers of seed S's cells (ROOT, then --cell/--base)
overrefusal() { local root=$1; shift; python benchmarks/erosion_overrefusal.py --seeds "$S" \
    --epochs 1 --threads 1 --task-data "$root/task.json" --model "$MODEL" "$@"; }
