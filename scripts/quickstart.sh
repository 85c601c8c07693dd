#!/usr/bin/env bash
# Set up .venv when needed, then run the whole tiny chain on CPU:
# data -> tokenizer -> pretrain -> export -> SFT -> reward -> PPO -> eval -> report.
#   scripts/quickstart.sh [--out runs/quickstart] [extra `align pipeline` options]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ALIGN_ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out="runs/quickstart"
if [ "${1:-}" = "--out" ]; then out="$2"; shift 2; fi
exec "$VPY" -m align.cli pipeline --preset tiny --out "$out" "$@"
