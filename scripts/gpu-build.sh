#!/usr/bin/env bash
# Builds, on a CPU machine, what `scripts/gpu-check.sh` runs on a GPU machine that has neither
# Rust nor LLVM: gpu-artifacts/ with
#   - einfuse, built without the `llvm` feature (it loads PTX through the CUDA driver, found at
#     run time, and runs the interpreter for the reference outputs);
#   - the PTX of every corpus kernel (optimized) and of the benchmark kernels, with their sources,
#     listed in kernels.txt (`file kernel form ptx`; form `optimized`, `bench`, or `splitKEYS`
#     for the split-key form of decode, whose two kernels are `chunks.ptx,merge.ptx`).
# Carry gpu-artifacts/ to the GPU machine (the device tool: carry ["gpu-artifacts"]). A rehearsal
# here: bash scripts/gpu-check.sh --emulate OUT (the kernels emulated, PyTorch on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

art=gpu-artifacts
rm -rf "$art"
mkdir -p "$art/examples" "$art/benches" "$art/tests/filetests"
cargo build --quiet --release --bin einfuse
cargo build --quiet --release --bin einfuse --no-default-features --features cuda --target-dir target/no-llvm
cp target/no-llvm/release/einfuse "$art/einfuse"
strip "$art/einfuse" 2>/dev/null || true
: > "$art/kernels.txt"
for file in examples/*.ein benches/attention.ein tests/filetests/features.ein; do
  cp "$file" "$art/$file"
  for kernel in $(grep -o '^kernel [A-Za-z_0-9]*' "$file" | cut -d' ' -f2); do
    form=optimized
    if [ "$file" = benches/attention.ein ]; then
      case "$kernel" in
        gpu_prefill | gpu_prefill_bf16 | gpu_prefill_d128 | decode) form=bench ;;
        *) continue ;;
      esac
    fi
    # f16 and bf16 inputs and a bf16 output, checked against the interpreter.
    if [ "$file" = tests/filetests/features.ein ] && [ "$kernel" != types_and_scalars ]; then
      continue
    fi
    ptx="$(basename "$file" .ein).$kernel.ptx"
    target/release/einfuse compile --target nvptx "$file" --kernel "$kernel" -o "$art/$ptx" >/dev/null
    echo "$file $kernel $form $ptx" >> "$art/kernels.txt"
  done
done
# Decode (one query, 16384 keys) split into chunks computed at once, then merged.
# PyTorch's layout (benches/gpu.ein): the 16-bit kernels on tensor cores, timed; fp32 on the
# thread kernel. The tensor-core kernels of tests/tensor_cores/ are checked at small shapes.
mkdir -p "$art/tests/tensor_cores"
cp benches/gpu.ein "$art/benches/gpu.ein"
cp tests/tensor_cores/kernels.ein "$art/tests/tensor_cores/kernels.ein"
for kernel in $(grep -o '^kernel [A-Za-z_0-9]*' benches/gpu.ein | cut -d' ' -f2); do
  case "$kernel" in
    tc_*) form=tensor-cores-bench; flags=(--tensor-cores) ;;
    *) form=bench; flags=() ;;
  esac
  target/release/einfuse compile --target nvptx benches/gpu.ein --kernel "$kernel" ${flags[@]+"${flags[@]}"} \
    -o "$art/gpu.$kernel.ptx" >/dev/null
  echo "benches/gpu.ein $kernel $form gpu.$kernel.ptx" >> "$art/kernels.txt"
done
for kernel in $(grep -o '^kernel [A-Za-z_0-9]*' tests/tensor_cores/kernels.ein | cut -d' ' -f2); do
  target/release/einfuse compile --target nvptx tests/tensor_cores/kernels.ein --kernel "$kernel" --tensor-cores \
    -o "$art/tensor_cores.$kernel.ptx" >/dev/null
  echo "tests/tensor_cores/kernels.ein $kernel tensor-cores tensor_cores.$kernel.ptx" >> "$art/kernels.txt"
done
# The split-key forms of both decode kernels: `file kernel` pairs.
for pair in "benches/gpu.ein decode_bf16" "benches/attention.ein decode"; do
  read -r file kernel <<< "$pair"
  for keys in 256 1024; do
    base="$(basename "$file" .ein).$kernel.split$keys"
    target/release/einfuse compile --target nvptx "$file" --kernel "$kernel" --split-keys "$keys" \
      -o "$art/$base.ptx" >/dev/null
    echo "$file $kernel split$keys $base.chunks.ptx,$base.merge.ptx" >> "$art/kernels.txt"
  done
done
du -sh "$art"
echo "$(wc -l < "$art/kernels.txt") kernels in $art"
