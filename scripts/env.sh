#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
# Usage: source scripts/env.sh [extras]   (extras: test, examples or test,examples)
# torch==2.13.0 goes in first where no torch is importable: on this kind of machine it is a
# local CPU wheel, while a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-test,examples}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[${extras}]"
# the PyPI package `parameterized` (a test utility) would shadow our top-level package
if python -m pip show parameterized >/dev/null 2>&1; then
  python -m pip uninstall -y -q parameterized
fi
