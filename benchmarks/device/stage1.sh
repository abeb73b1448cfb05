#!/usr/bin/env bash
# Device call 1 of a GPU quality run (carry .whl and .gpu1): install the carried wheels and this
# package under /tmp/site, keep the GGUF's first part, then the CUDA smoke (benchmarks/device/smoke.py).
set -euo pipefail
SITE=${QPO_SITE:-/tmp/site}
mkdir -p /tmp/qpo-gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target $SITE .
cp .gpu1/gguf.part1 /tmp/qpo-gpu/gguf.part1
mkdir -p /tmp/qpo-gpu/tokenizer && tar -xJf .gpu1/tokenizer.tar.xz -C /tmp/qpo-gpu/tokenizer
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/device/smoke.py --tokenizer /tmp/qpo-gpu/tokenizer --work /tmp/qpo-gpu/smoke --out "$OUT"
