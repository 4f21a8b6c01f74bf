#!/usr/bin/env bash
# Create the environment and run the quickstart: real data (sklearn's digits), no download.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh examples
python examples/quickstart.py "$@"
