#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need when it is missing (see
# scripts/deps.sh): LLVM 14's development files, and a Python virtual environment (.venv) with
# NumPy (the cross-check against NumPy) and ptxas (the PTX of every kernel is assembled with it).
set -euo pipefail
cd "$(dirname "$0")/.."

EINFUSE_PYTHON_DEPS=1
source scripts/deps.sh

cargo test --workspace "$@"
