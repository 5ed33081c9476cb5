#!/usr/bin/env bash
# Install everything (CPU torch pinned by constraints.txt) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e ".[test]"
python -m pytest -q "$@"
