# The set-up every script that runs on a lent GPU shares; source it, then call gpu_setup OUT.
# The GPU machine has torch, transformers, peft and accelerate but no network, no ../shared and
# not the offline Qwen packages, so it expects, carried beside the repo (ignored paths):
#   .whl/             wheels it lacks (benchmarks/gpu_wheels.sh); only those named in
#                     GPU_WHEELS are installed: gpu_wheels.sh also fetches an older regex, which,
#                     first on the path, stops the machine's transformers from importing
#   .gpu/shared/data  a copy of ../shared/data
#   .qwen/q0..q8      the Qwen2.5-Coder-0.5B-Instruct GGUF cut with `split -b 56m -d -a 1`, only
#                     when the model is not cached there yet. A call carries at most 64 MiB and
#                     keeps none of the paths an earlier call carried, so carry one piece per
#                     call, each call copying it to /tmp/q (a warm machine keeps /tmp), then
#                     `cp /tmp/q/q? .qwen/` in the call that runs the script.
# After gpu_setup, `python` and `sealft` run the checkout's code, and the hub id
# Qwen/Qwen2.5-Coder-0.5B-Instruct loads offline from sealft's cache as it does on the CPU, so a
# config needs no other model path there.
GPU_WHEELS=${GPU_WHEELS:-"datasets dill multiprocess xxhash fsspec gguf data_selection nltk defusedxml"}

gpu_setup() {
  local out=$1 wheels=() name
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  for name in $GPU_WHEELS; do
    if compgen -G ".whl/$name-*.whl" > /dev/null; then wheels+=(.whl/"$name"-*.whl); fi
  done
  if ((${#wheels[@]})); then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${wheels[@]}" || return 1
  fi
  export PYTHONPATH=/tmp/site:$PWD/src
  # python3 is a venv's there: a symlink to it would lose the venv's packages
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python
  printf '#!/bin/sh\nexec python3 -m sealft "$@"\n' > /tmp/bin/sealft
  chmod +x /tmp/bin/python /tmp/bin/sealft && export PATH=/tmp/bin:$PATH
  [ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
  # dequantised once into sealft's cache rather than in every process
  local qwen=Qwen/Qwen2.5-Coder-0.5B-Instruct
  python3 -c "import sys; from sealft.models import resolve_model; resolve_model(sys.argv[1])" \
    "$qwen" 2> /dev/null && return 0
  cat .qwen/q? > /tmp/qwen.gguf || return 1
  python3 -c "import sys; from sealft.models import cache_from_gguf; print('cached:',
cache_from_gguf(sys.argv[1], sys.argv[2]))" "$qwen" /tmp/qwen.gguf
}
