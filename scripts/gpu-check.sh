#!/usr/bin/env bash
# On a GPU machine (PyTorch installed; no Rust, no LLVM): runs the PTX kernels that
# scripts/gpu-build.sh put in gpu-artifacts/ against the interpreter, times the attention kernel
# (H=32, P=M=4096, head dimension 64 in f32 and with bf16 storage, head dimension 128 in f32;
# decode and its split-key forms) and PyTorch's scaled_dot_product_attention on the same inputs, and writes the reports
# (text) to the folder given as the argument. Well under 5 minutes.
#   usage: scripts/gpu-check.sh [--emulate] OUT
# With --emulate (on the machine that built gpu-artifacts/, without a GPU): a rehearsal, the
# kernels emulated by target/release/einfuse and PyTorch on the CPU; the times mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
einfuse=gpu-artifacts/einfuse
emulate=()
torch_mode=gpu
if [ "${1:-}" = --emulate ]; then
  einfuse=target/release/einfuse
  emulate=(--emulate)
  torch_mode=rehearse
  shift
fi
out=${1:?usage: scripts/gpu-check.sh [--emulate] OUT}
art=gpu-artifacts
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
status=0
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true) > "$out/nvidia-smi.txt" 2>&1
echo "== einfuse gpu-check (every kernel against the interpreter, then the benchmark)"
if [ ${#emulate[@]} -eq 0 ]; then limit=200; else limit=1800; fi
timeout "$limit" "$einfuse" gpu-check ${emulate[@]+"${emulate[@]}"} "$art" "$work" 2>&1 | tee "$out/gpu-check.log" || status=1
echo "== PyTorch on the same inputs"
PYTHONUNBUFFERED=1 timeout 90 python3 benches/compare_torch.py "$torch_mode" "$work" 2>&1 | tee "$out/torch.log" || status=1
cp "$work"/*.txt "$out"/ 2>/dev/null || true
exit $status
