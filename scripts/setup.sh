#!/usr/bin/env bash
# Idempotent set-up shared by the README's two commands: a virtual environment with ravit and its test tools,
# and the Fashion-MNIST files (Debian package dataset-fashion-mnist) when they can be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${RAVIT_VENV:-.venv}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.ravit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ ci/constraints.txt -nt "$stamp" ]; then
  echo "[setup] installing ravit and its dependencies (torch pinned by ci/constraints.txt)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c ci/constraints.txt -e ".[test]"
  touch "$stamp"
fi

# ravit's CPU kernels for FAN inference, compiled once for this machine and torch (ravit/layers/cpu_kernels.py);
# without them FAN runs its oneDNN path: same outputs, slower on a CPU
if ! "$VENV/bin/ravit" kernels build; then
  echo "[setup] ravit's CPU kernels were not built (see above); FAN falls back to its oneDNN path" >&2
fi

if [ ! -f "$FMNIST_DIR/t10k-images-idx3-ubyte.gz" ] && [ -z "${RAVIT_FMNIST_DIR:-}" ]; then
  echo "[setup] Fashion-MNIST not found at $FMNIST_DIR; installing the Debian package dataset-fashion-mnist"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    $SUDO apt-get update -qq || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null || true
  fi
  if [ ! -f "$FMNIST_DIR/t10k-images-idx3-ubyte.gz" ]; then
    echo "[setup] could not install dataset-fashion-mnist. Install it ('apt-get install dataset-fashion-mnist') or" >&2
    echo "        put the four gzipped IDX files in a folder and set RAVIT_FMNIST_DIR to it." >&2
    echo "        Tests that need the data will be skipped with that reason." >&2
  fi
fi
