#!/usr/bin/env bash
# Seeds of the gentle regime's core cells (benchmarks/gentle_core_cells.sh) side by side on one
# lent GPU, float32 like the CPU runs. The device has no network, no ../shared and not the
# offline Qwen packages, so this expects, carried beside the repo (ignored paths):
#   .whl/            wheels the device lacks (benchmarks/gpu_wheels.sh)
#   .qwen/q0..q8     the Qwen2.5-Coder-0.5B-Instruct GGUF cut with `split -b 56m -d -a 1`. One
#                    piece fits a call's carry limit, and a call keeps none of the paths an
#                    earlier call carried (seen 2026-12-04), so carry one piece per call, each
#                    call copying it to /tmp/q (a warm machine keeps /tmp), then
#                    `cp /tmp/q/q? .qwen/` in the call that runs this (carrying .whl and .gpu)
#   .gpu/shared/data a copy of ../shared/data
#   .gpu/task.json   the held-out task answers the CPU seeds were scored on (same rows)
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
mkdir -p "$OUT" "$ROOT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# only the packages the device lacks: gpu_wheels.sh also fetches an older regex, which, first on
# the path, stops the device's transformers from importing
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/{datasets,dill,multiprocess,xxhash,fsspec,gguf}-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
# the scripts call `python` and `sealft`; the device has python3 (a venv's: a symlink to it
# would lose the venv's packages) and no installed sealft
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python
printf '#!/bin/sh\nexec python3 -m sealft "$@"\n' > /tmp/bin/sealft && chmod +x /tmp/bin/sealft
export PATH=/tmp/bin:$PATH
[ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ ! -f /tmp/qwen-hf/config.json ]; then
  cat .qwen/q? > /tmp/qwen.gguf
  echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/qwen.gguf" \
    | sha256sum -c || exit 1
  # dequantised once here instead of in every process (the CPU runs load the same GGUF)
  python3 -c "
from sealft.models import load_model_and_tokenizer
m, t = load_model_and_tokenizer('/tmp/qwen.gguf')
m.save_pretrained('/tmp/qwen-hf', safe_serialization=True); t.save_pretrained('/tmp/qwen-hf')
" || exit 1
fi
[ -f "$ROOT/task.json" ] || cp .gpu/task.json "$ROOT/task.json"
export MODEL=/tmp/qwen-hf
pids=()
for s in $SEEDS; do
  bash benchmarks/gentle_core_cells.sh "$s" "$ROOT" >> "$ROOT/core-s$s.log" 2>&1 &
  pids+=($!)
done
( sleep "$DEADLINE"; pkill -f -- "gentle_core_cells.sh"
  pkill -f -- "benchmarks/(erosion_|heldout_)|-m sealft" ) &
watchdog=$!
wait "${pids[@]}"
kill "$watchdog" 2>/dev/null
grep -h "gentle core cells, seed .*: done" "$ROOT"/core-s*.log | tee "$OUT/done.txt"
# results and logs only: the fine-tuning folders' adapters, checkpoints and snapshots come to
# hundreds of MB a seed, past what a call brings back
(cd "$ROOT" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' -o -name '*.log' \
  -o -name '*.md' \) -size -5M -not -path '*/adapter/*' -not -path '*/checkpoint*' \
  -not -path '*/snapshots/*' > /tmp/gentle-files) && tar czf "$OUT/gentle.tgz" -C "$ROOT" -T /tmp/gentle-files
