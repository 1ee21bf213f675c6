#!/usr/bin/env bash
# Create .venv/ (Python 3.12) at the repo root and install the package with its test extra.
# Skips work already done: the install re-runs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    for cand in "${PYTHON:-}" python3.12; do
        [ -n "$cand" ] || continue
        if PYENV_VERSION="${PYENV_VERSION:-3.12.1}" "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    echo "error: Python 3.12 not found (set PYTHON=/path/to/python3.12)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    py=$(find_python)
    echo "[setup] creating .venv with $py"
    PYENV_VERSION="${PYENV_VERSION:-3.12.1}" "$py" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing sglang-megatron-loader[test] (first time: several minutes, ~11 GB)"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import sglang, sglang_megatron_loader, megatron.core" >/dev/null
    rm -f .venv/.installed-*
    touch "$stamp"
fi
echo "[setup] .venv ready"
