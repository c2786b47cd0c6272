#!/usr/bin/env bash
# The main job on a fresh machine: install, then `slimray run`: prepare -> fine-tune (Ray Train + DeepSpeed
# ZeRO-3, 2 workers) -> compression search (Ray Tune) -> serving smoke test (Ray Serve) -> report.md.
# Without arguments it runs the quick profile on the built-in Harbor Lane Bank sample (offline, about
# 10 minutes on 2 cores) into runs/harbor_bank-quick/. Arguments go to `slimray run`, for example
#   bash scripts/quickstart.sh --data ../shared/data/banking77 --profile full
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slimray run "$@"
