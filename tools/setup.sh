#!/usr/bin/env bash
# Create ./.venv with Python 3.12 and install megaspan (+ test tools) into it. Idempotent.
#
#   tools/setup.sh            # then: .venv/bin/megaspan train
#
# Python 3.12 is required (megatron-core >= 0.17). Found as: $MEGASPAN_PYTHON, a working
# `python3.12`, pyenv's 3.12.x (PYENV_VERSION or its versions dir), in that order.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local candidate
    if [[ -n ${MEGASPAN_PYTHON:-} ]]; then
        echo "$MEGASPAN_PYTHON"; return 0
    fi
    if python3.12 -c 'import sys' >/dev/null 2>&1; then
        command -v python3.12; return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        for candidate in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
            if [[ -x $candidate ]]; then echo "$candidate"; return 0; fi
        done
    fi
    for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
        if [[ -x $candidate ]]; then echo "$candidate"; return 0; fi
    done
    return 1
}

PY=$(find_python) || {
    echo "megaspan: error: Python 3.12 not found: install it (pyenv install 3.12) or set MEGASPAN_PYTHON" >&2
    exit 2
}

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    rm -rf .venv
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: the PyPI build for 3.12 is the CUDA one and runs on CPU too; pinning keeps
# reinstalls on pip's cache instead of pulling a newer multi-GB release.
.venv/bin/python -m pip install --quiet "torch==${MEGASPAN_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test,eval,data,wandb]"
.venv/bin/python -c 'import megatron.core, megaspan; print("megaspan", megaspan.__version__, "megatron-core", megatron.core.__version__)' 2>/dev/null
