#!/usr/bin/env bash
# One device call of the GPU latency check; carry .lat0 and .latK for call K (latency_prepare.sh made them).
#   bash benchmarks/device/latency_call.sh K         keep part K of the onnxruntime-gpu wheel (calls 1 … N-1)
#   bash benchmarks/device/latency_call.sh N last    keep the last part, install, run gpu_latency.py (~2 min)
# Make the calls back to back: a warm machine keeps /tmp between calls and goes back after 30 s idle.
set -euo pipefail
K=$1
STAGE=/tmp/qpo-lat
SITE=$STAGE/site
mkdir -p $STAGE
cp .lat$K/part* $STAGE/
ls -la $STAGE
[ "${2:-}" = last ] || exit 0
WHEEL=$STAGE/$(cat .lat0/wheel-name)
cat $STAGE/part* > "$WHEEL"
(cd $STAGE && sha256sum -c "$OLDPWD/.lat0/wheel.sha256")
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE "$WHEEL" .lat0/whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target $SITE .
mkdir -p $STAGE/tokenizer && tar -xJf .lat0/tokenizer.tar.xz -C $STAGE/tokenizer
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/device/gpu_latency.py --tokenizer $STAGE/tokenizer --work $STAGE/work --out "$OUT"
