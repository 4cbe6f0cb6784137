#!/usr/bin/env bash
# The README's main command: sets everything up, then runs the main job on the built-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${RAVIT_VENV:-.venv}
"$VENV/bin/ravit" study "$@"
