#!/usr/bin/env bash
# The main job on a fresh machine: install, then prepare -> fine-tune (Ray Train + DeepSpeed ZeRO-3, 2 workers,
# a short run) -> evaluate. Data: the first argument, else BANKING77 from ../shared/data when present, else the
# built-in Harbor Lane Bank sample (works offline, anywhere). Outputs in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source=${1:-}
if [ -z "$source" ]; then
  if [ -d ../shared/data/banking77 ]; then source=../shared/data/banking77; else source=jobs/samples/harbor_bank; fi
fi
run=runs/quickstart
.venv/bin/slimray prepare --source "$source" --out "$run/data" --overwrite
.venv/bin/slimray finetune --data "$run/data" --model minilm --workers 2 --zero-stage 3 --max-steps 150 \
  --batch-size 16 --lr 2e-4 --checkpoint-every 50 --out "$run/ft" --overwrite
.venv/bin/slimray evaluate --model "$run/ft" --data "$run/data" --split test --out "$run/eval" --overwrite
echo "Model folder: $run/ft (load it with AutoModelForSequenceClassification.from_pretrained(\"$run/ft\"))"
