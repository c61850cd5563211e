#!/usr/bin/env bash
# The selection sweep (benchmarks/selection_sweep.py) on a lent GPU, in float32 like the CPU
# runs. The device has torch / transformers / peft / accelerate but not datasets or gguf, no
# network and no ../shared: this script expects, carried beside the repo (ignored paths),
#   .whl/   wheels of datasets, dill, multiprocess, gguf (pip download --python-version 3.12)
#   .qwen/  the Qwen2.5-Coder-0.5B-Instruct GGUF split in pieces q0..q8 (split -b 56m)
#   .gpu/   dev mixes (benchmarks/dev_mixes.py), the SST-2 mixes and the safe set
# and writes the sweep's JSONL and logs under $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ ! -d /tmp/qwen-hf ]; then
  cat .qwen/q? > /tmp/qwen.gguf
  echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/qwen.gguf" | sha256sum -c || exit 1
  python3 -c "
from sealft.models import load_model_and_tokenizer
m, t = load_model_and_tokenizer('/tmp/qwen.gguf')
m.save_pretrained('/tmp/qwen-hf', safe_serialization=True); t.save_pretrained('/tmp/qwen-hf')
" || exit 1
fi
sweep() {  # budget-seconds, variants, then file arguments
  local budget=$1 variants=$2; shift 2
  python3 benchmarks/selection_sweep.py --model /tmp/qwen-hf --safe-data .gpu/safetyllamas_safety_only.json \
    --results "$OUT/sweep.jsonl" --work-dir /tmp/sweep --budget-seconds "$budget" \
    --variants "$variants" "$@" 2>>"$OUT/sweep.log" | grep -v "^{" | tee -a "$OUT/tables.md"
}
DEV=(.gpu/dev/*.jsonl); SST2=(.gpu/sst2_n1000_p0.05.json .gpu/sst2_n1000_p0.1.json .gpu/sst2_n1000_p0.2.json)
sweep ${B1:-170} default,visits --mixes "${DEV[@]}" --sst2 "${SST2[@]}" --seeds 0 1 2
sweep ${B2:-90} paper-budget,visits-paper-budget --mixes "${DEV[@]}"
sweep ${B3:-90} margin-4-tokens,loss-8-tokens,loss-shift-8-tokens,strong-safety-pull --mixes .gpu/dev/*_s0.jsonl
