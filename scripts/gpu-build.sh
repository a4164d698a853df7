#!/usr/bin/env bash
# Builds, on a CPU machine, what `scripts/gpu-check.sh` runs on a GPU machine that has neither
# Rust nor LLVM: gpu-artifacts/ with
#   - einfuse, built without the `llvm` feature (it loads PTX through the CUDA driver, found at
#     run time, and runs the interpreter for the reference outputs);
#   - the PTX of every corpus kernel (optimized) and of the benchmark kernel, with their sources,
#     listed in kernels.txt (`file kernel form ptx`; form `optimized` or `bench`).
# Carry gpu-artifacts/ to the GPU machine (the device tool: carry ["gpu-artifacts"]).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

art=gpu-artifacts
rm -rf "$art"
mkdir -p "$art/examples" "$art/benches"
cargo build --quiet --release --bin einfuse
cargo build --quiet --release --bin einfuse --no-default-features --features cuda --target-dir target/no-llvm
cp target/no-llvm/release/einfuse "$art/einfuse"
strip "$art/einfuse" 2>/dev/null || true
: > "$art/kernels.txt"
for file in examples/*.ein benches/attention.ein; do
  cp "$file" "$art/$file"
  for kernel in $(grep -o '^kernel [A-Za-z_0-9]*' "$file" | cut -d' ' -f2); do
    form=optimized
    if [ "$file" = benches/attention.ein ]; then
      [ "$kernel" = gpu_prefill ] || continue
      form=bench
    fi
    ptx="$(basename "$file" .ein).$kernel.ptx"
    target/release/einfuse compile --target nvptx "$file" --kernel "$kernel" -o "$art/$ptx" >/dev/null
    echo "$file $kernel $form $ptx" >> "$art/kernels.txt"
  done
done
du -sh "$art"
echo "$(wc -l < "$art/kernels.txt") kernels in $art"
