#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need when it is missing:
# a Python virtual environment (.venv) with NumPy, for the cross-check against NumPy.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c 'import numpy' >/dev/null 2>&1; then
  echo "== setting up .venv with NumPy"
  if ! python3 -m venv .venv >/dev/null 2>&1; then
    # Debian keeps the venv module in its own package.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    rm -rf .venv
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --disable-pip-version-check numpy
fi
export EINFUSE_PYTHON="$PWD/.venv/bin/python"

cargo test --workspace "$@"
