#!/usr/bin/env bash
# Runs every test: the workspace's, then the Python package's (scripts/python-test.sh). Installs
# what the tests need when it is missing (see scripts/deps.sh): LLVM 14's development files, a
# Python virtual environment (.venv) with NumPy (the cross-check against NumPy) and ptxas (the PTX
# of every kernel is assembled with it), and for the Python package an environment with PyTorch
# outside the clone (~/.cache/einfuse/torch-venv, reused by every checkout).
set -euo pipefail
cd "$(dirname "$0")/.."

EINFUSE_PYTHON_DEPS=1
source scripts/deps.sh

cargo test --workspace "$@"
bash scripts/python-test.sh
