#!/usr/bin/env bash
# Create the environment and run the default test suite (slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh test,examples
python -m pytest -q "$@"
