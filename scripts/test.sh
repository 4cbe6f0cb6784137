#!/usr/bin/env bash
# The README's test command: sets everything up, then runs ruff and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RAVIT_VENV:-.venv}
"$VENV/bin/ruff" check ravit tests benchmarks
"$VENV/bin/python" -m pytest -q "$@"
