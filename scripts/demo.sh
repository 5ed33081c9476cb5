#!/usr/bin/env bash
# Install everything and run the main job on the bundled water example.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e ".[all]"
dpmd demo "$@"
