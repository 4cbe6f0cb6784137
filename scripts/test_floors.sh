#!/usr/bin/env bash
# CI's second pass: the test suite once more with timm at the floor pyproject.toml declares, so the floor stays true.
# torch/torchvision stay at ci/constraints.txt (the only builds on this machine's disk); the README says so.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RAVIT_VENV:-.venv}
floor=$(sed -n 's/.*"timm>=\([0-9.]*\)".*/\1/p' pyproject.toml)
target="$VENV/floors/timm-$floor"
if [ ! -f "$target/.installed" ]; then
  echo "[floors] installing timm==$floor into $target"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --target "$target" "timm==$floor"
  touch "$target/.installed"
fi
PYTHONPATH="$target" "$VENV/bin/python" -c "import timm; assert timm.__version__ == '$floor', timm.__version__"
echo "[floors] test suite with timm $floor"
PYTHONPATH="$target" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
