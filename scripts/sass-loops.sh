#!/usr/bin/env bash
# The machine code of a GPU kernel without a GPU: compiles a kernel to PTX, assembles it with
# ptxas for an architecture, disassembles it with nvdisasm, and prints every loop body (a
# backward branch's target up to the branch) with its instruction mix, largest first (for a
# tensor-core kernel, `-- --tensor-cores`, also its HMMA, LDSM, LDGSTS, SHFL and MUFU).
#
#   bash scripts/sass-loops.sh FILE KERNEL [ARCH] [-- extra `einfuse compile` options]
#
# ARCH defaults to sm_90. ptxas comes from .venv (scripts/deps.sh with EINFUSE_PYTHON_DEPS=1);
# nvdisasm from NVIDIA's `nvidia-cuda-nvdisasm` wheel, installed into .venv when missing.
# A static count, not a timing: it shows how many instructions and loads each multiply-add
# of a hot loop costs, and that nothing spills.
set -euo pipefail
cd "$(dirname "$0")/.."
file=$1
kernel=$2
arch=${3:-sm_90}
shift $(($# < 3 ? $# : 3))
[ "${1:-}" = "--" ] && shift
EINFUSE_PYTHON_DEPS=1 source scripts/deps.sh
nvdisasm=$(ls .venv/lib/python3*/site-packages/nvidia/cu*/bin/nvdisasm 2>/dev/null | head -n 1 || true)
if [ -z "$nvdisasm" ]; then
  echo "== installing nvdisasm (nvidia-cuda-nvdisasm) into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvdisasm
  nvdisasm=$(ls .venv/lib/python3*/site-packages/nvidia/cu*/bin/nvdisasm | head -n 1)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --quiet --release --bin einfuse
target/release/einfuse compile --target nvptx "$file" --kernel "$kernel" -o "$work/k.ptx" "$@" >/dev/null
"$EINFUSE_PTXAS" -v --gpu-name "$arch" "$work/k.ptx" -o "$work/k.cubin" 2>&1 | grep -E 'registers|spill' || true
"$nvdisasm" "$work/k.cubin" 2>/dev/null > "$work/k.sass"
# A loop: from a label to the last branch back to it.
awk '
  match($0, /^\.L_x_[0-9]+:/) { label = substr($0, 1, RLENGTH - 1); start[label] = n }
  /\/\*[0-9a-f]+\*\// {
    text[n] = $0; n++
    if (match($0, /BRA `\(\.L_x_[0-9]+\)/)) {
      target = substr($0, RSTART + 6, RLENGTH - 7)
      if (target in start) last[target] = n - 1
    }
  }
  END {
    for (l in last) {
      total = 0; ffma = 0; fmul = 0; loads = 0; shared = 0; stores = 0; other = 0
      hmma = 0; ldsm = 0; copies = 0; shuffles = 0; mufu = 0
      for (i = start[l]; i <= last[l]; i++) {
        total++
        if (text[i] ~ /HMMA/) hmma++
        else if (text[i] ~ /LDSM/) ldsm++
        else if (text[i] ~ /LDGSTS/) copies++
        else if (text[i] ~ /SHFL/) shuffles++
        else if (text[i] ~ /MUFU/) mufu++
        else if (text[i] ~ /FFMA/) ffma++
        else if (text[i] ~ /FMUL/) fmul++
        else if (text[i] ~ /[ \t]LDS/) shared++
        else if (text[i] ~ /[ \t](LD|LDG)[. ]/) loads++
        else if (text[i] ~ /[ \t](ST|STG|STS)[. ]/) stores++
      }
      printf "%6d instructions  %4d FFMA  %4d FMUL  %4d LD  %4d LDS  %4d stores", total, ffma, fmul, loads, shared, stores
      if (hmma + ldsm + copies > 0) printf "  %4d HMMA  %4d LDSM  %4d LDGSTS  %4d SHFL  %4d MUFU", hmma, ldsm, copies, shuffles, mufu
      printf "   loop %s\n", l
    }
  }' "$work/k.sass" | sort -rn | head -n 12
