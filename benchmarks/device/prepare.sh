#!/usr/bin/env bash
# Run HERE (not on the device) before the two device calls of a GPU quality run. It fills three
# folders that .git/info/exclude ignores and the device calls carry:
#   .whl   wheels the device image lacks or has in other versions (transformers 4.57, tokenizers,
#          huggingface_hub, gguf; the image has transformers 5.x and no gguf)
#   .gpu1  the first part of the SmolLM2 GGUF and SmolLM2's tokenizer/config (for the CUDA smoke)
#   .gpu2  the rest of the GGUF, its sha256 and the task data (sst2, ag_news)
# A call carries at most 64 MiB, the GGUF is 94 MiB: hence two calls (stage1.sh, then stage2.sh
# on the still-warm machine). See benchmarks/device/README.md.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for path in /.whl/ /.gpu1/ /.gpu2/; do
  grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude
done
DATA=${QPO_DATA:-../shared/data}
GGUF=$(python -c "from qpo_middleware.training.models import embedded_gguf_path; print(embedded_gguf_path())")
MODEL=$(python -c "from qpo_middleware.training.models import resolve_model; print(resolve_model())")
rm -rf .whl .gpu1 .gpu2 && mkdir -p .whl .gpu1 .gpu2
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 gguf==0.19.0
head -c 44000000 "$GGUF" > .gpu1/gguf.part1
tail -c +44000001 "$GGUF" > .gpu2/gguf.part2
(cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") > .gpu2/gguf.sha256
tar -cJf .gpu1/tokenizer.tar.xz -C "$MODEL" tokenizer.json tokenizer_config.json special_tokens_map.json \
  chat_template.jinja config.json generation_config.json
tar -cJf .gpu2/data.tar.xz -C "$DATA" sst2 ag_news
du -sh .whl .gpu1 .gpu2
