#!/usr/bin/env bash
# The Python package's tests (python/tests). Sets up a virtual environment outside the clone when
# it is missing (PyTorch from PyPI is about 5 GB installed, so every checkout and CI run reuses
# it): NumPy, PyTorch, pytest and maturin, pinned. Then installs the package from the repository,
# as a user would (`pip install ./python`, which builds the Rust extension), and runs pytest.
#   EINFUSE_TORCH_VENV_DIR   where the environment lives (default ~/.cache/einfuse/torch-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${EINFUSE_TORCH_VENV_DIR:-$HOME/.cache/einfuse/torch-venv}
python="$venv/bin/python"
requirements=(numpy==2.4.6 torch==2.15.0 pytest==9.2.0 maturin==1.16.0)
if [ ! -x "$python" ]; then
  echo "== creating $venv"
  python3 -m venv "$venv"
fi
if ! "$python" -c 'import numpy, torch, pytest' >/dev/null 2>&1 || [ ! -x "$venv/bin/maturin" ]; then
  echo "== installing ${requirements[*]} into $venv (PyTorch is a large download)"
  "$python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
fi

echo "== pip install ./python (builds the extension in release mode)"
# maturin's build backend runs `maturin` from PATH; without build isolation nothing is downloaded.
PATH="$venv/bin:$PATH" "$python" -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps --force-reinstall ./python

echo "== pytest python/tests"
"$python" -m pytest -q python/tests "$@"
