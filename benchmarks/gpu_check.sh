#!/usr/bin/env bash
# One-GPU check (≤ 8 minutes on one H200): Algorithms 1 and 2, fine-tuning and a short
# evaluation with the Qwen2.5-0.5B architecture (random weights) in bf16, the step-cost ratios
# and peak GPU memory. Nothing is downloaded: wheels the machine lacks (datasets, ...) come
# from .whl/ (benchmarks/gpu_wheels.sh fills it). Results under $OUT (default ./gpu_out).
#
#   bash benchmarks/gpu_check.sh                   # on the GPU machine
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh  # a tiny config, on any machine
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Carried wheels: install only those whose distribution is missing here, into a side folder
# that comes after the machine's own packages (never shadowing what is installed).
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
if compgen -G ".whl/*.whl" > /dev/null; then
  missing=()
  for wheel in .whl/*.whl; do
    dist=$(basename "$wheel" | cut -d- -f1)
    python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" \
      2> /dev/null || missing+=("$wheel")
  done
  if ((${#missing[@]})); then
    echo "[gpu_check] installing ${#missing[@]} carried wheels: ${missing[*]##*/}"
    python3 -m pip install -q --no-index --no-deps --target "$SITE" "${missing[@]}"
  fi
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}:$SITE"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2> /dev/null || true
  python3 -c "import torch, transformers, peft, accelerate, datasets, pyarrow; print('torch',
torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
'| peft', peft.__version__, '| accelerate', accelerate.__version__, '| datasets',
datasets.__version__, '| pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# 470 s on the GPU leaves time inside the 8 minutes for the imports above; TINY has no limit.
LIMIT=${GPU_CHECK_LIMIT:-$([ "${GPU_CHECK_TINY:-}" = 1 ] && echo 0 || echo 470)}
timeout "$LIMIT" python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
