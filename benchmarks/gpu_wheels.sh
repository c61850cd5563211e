#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that benchmarks/gpu_check.sh needs on the GPU
# machine and cannot fetch there (no network): datasets and the pure-Python or binary
# dependencies that machine lacks, plus gguf and data-selection (imported only for .gguf models
# and the DSIR baseline). Wheels go to .whl/ (git-ignored); carry it to the device with the
# run tool's carry=[".whl"]. gpu_check.sh installs only those whose package is missing there.
#
#   bash benchmarks/gpu_wheels.sh            # target: CPython 3.12, x86-64 Linux
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY_VERSION:-3.12}
# The versions this repo is tested with here (pip show), overridable one by one.
WHEELS=(
  "datasets==${DATASETS_VERSION:-5.2.0}"
  "dill==0.4.1"
  "multiprocess==0.70.19"
  "xxhash==4.1.0"
  "fsspec==2026.9.0"
  "gguf==0.19.0"
  "data-selection==1.0.3"
  "nltk==3.10.4"
  "click==8.1.8"
  "defusedxml==0.7.1"
  "regex==2025.9.18"
  "requests==2.32.5"
  "charset-normalizer==3.4.3"
  "idna==3.10"
  "urllib3==2.5.0"
  "certifi==2025.8.3"
)
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec" \
    || echo "gpu_wheels: could not download $spec (skipped)" >&2
done
# What each wheel asks for, to check against what the GPU machine has.
for wheel in .whl/*.whl; do
  echo "== $(basename "$wheel")"
  unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
done
du -sh .whl
