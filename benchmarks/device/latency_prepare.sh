#!/usr/bin/env bash
# Run HERE before the device calls of the GPU latency check (benchmarks/device/gpu_latency.py).
# The device image has a CPU onnxruntime and no optimum; onnxruntime-gpu's wheel is about 250 MB and
# a call carries 64 MiB, so the wheel travels in 60 MiB parts, one per call (latency_call.sh), and the
# last call installs everything and measures. Fills .lat0 (optimum wheels, the .whl set of prepare.sh,
# SmolLM2's tokenizer and config) and .lat1 … .latN (the parts). Prints N.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
MODEL=$(python -c "from qpo_middleware.training.models import resolve_model; print(resolve_model())")
rm -rf .lat* && mkdir -p .lat0/whl .latwheel
for path in /.lat*/; do grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude; done
PLATFORM="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d .lat0/whl \
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 optimum==2.1.0 optimum-onnx==0.1.0
python -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d .latwheel onnxruntime-gpu
tar -cJf .lat0/tokenizer.tar.xz -C "$MODEL" tokenizer.json tokenizer_config.json special_tokens_map.json \
  chat_template.jinja config.json generation_config.json
WHEEL=$(ls .latwheel/*.whl)
basename "$WHEEL" > .lat0/wheel-name
(cd .latwheel && sha256sum "$(basename "$WHEEL")") > .lat0/wheel.sha256
split -b 60M -d -a 1 "$WHEEL" .latwheel/part
i=1; for part in .latwheel/part*; do mkdir -p .lat$i && mv "$part" .lat$i/; i=$((i+1)); done
rm -rf .latwheel
du -sh .lat*
echo "parts: $((i-1))  (device calls: latency_call.sh 1 … then latency_call.sh $((i-1)) last)"
