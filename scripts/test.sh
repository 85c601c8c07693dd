#!/usr/bin/env bash
# Set up .venv when needed and run the test suite; the exit code is pytest's.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" || exit 1
cd "$ALIGN_ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
exec "$VPY" -m pytest "$@"
