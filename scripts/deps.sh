# Sourced by scripts/test.sh and scripts/demo.sh: installs what the build and the tests need when
# it is missing, and exports where it is.
#   - LLVM 14's development files (apt: llvm-14-dev), for the LLVM back ends (inkwell, linked
#     against libLLVM-14.so: feature llvm14-0-prefer-dynamic);
#   - with `EINFUSE_PYTHON_DEPS=1`: a Python virtual environment (.venv) with NumPy (the NumPy
#     cross-check) and ptxas from NVIDIA's nvidia-cuda-nvcc-cu12 wheel (the PTX checks).

apt_install() {
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: $* missing, and apt-get cannot install it here (not root, or no apt)" >&2
    return 1
  fi
}

if [ ! -x /usr/lib/llvm-14/bin/llvm-config ]; then
  echo "== installing LLVM 14 (llvm-14-dev)"
  apt_install llvm-14-dev
fi
export LLVM_SYS_140_PREFIX=/usr/lib/llvm-14

if [ "${EINFUSE_PYTHON_DEPS:-0}" = 1 ]; then
  if ! .venv/bin/python -c 'import numpy' >/dev/null 2>&1; then
    echo "== setting up .venv with NumPy"
    if ! python3 -m venv .venv >/dev/null 2>&1; then
      # Debian keeps the venv module in its own package.
      apt_install python3-venv || true
      rm -rf .venv
      python3 -m venv .venv
    fi
    .venv/bin/python -m pip install --quiet --disable-pip-version-check numpy
  fi
  ptxas=$(ls .venv/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas 2>/dev/null | head -n 1 || true)
  if [ -z "$ptxas" ]; then
    echo "== installing ptxas (nvidia-cuda-nvcc-cu12) into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check 'nvidia-cuda-nvcc-cu12==12.9.86'
    ptxas=$(ls .venv/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas | head -n 1)
  fi
  export EINFUSE_PYTHON="$PWD/.venv/bin/python"
  export EINFUSE_PTXAS="$PWD/$ptxas"
fi
