#!/usr/bin/env bash
# The demonstration, on softmax attention as the textbook writes it:
#   1. check it, and count its passes over the keys (3), as written and after optimization (1);
#   2. print the cascade the e-graph optimizer found (the FlashAttention-style 1-pass form);
#   3. run both on the reference interpreter with the same random inputs and compare them;
#   4. JIT-compile it for this CPU (Cranelift), run it against the interpreter, and time it
#      against the same cascade compiled as written (unfused);
#   5. the same through LLVM: the CPU tier timed beside Cranelift's, and the GPU kernel as PTX and
#      run in emulation (its grid as loops on this CPU) against the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

cargo build --quiet --bin einfuse
einfuse=target/debug/einfuse
file=examples/attention.ein
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== einfuse check $file"
$einfuse check $file
echo
echo "== einfuse analyze $file --kernel attention"
$einfuse analyze $file --kernel attention
echo
echo "== einfuse emit --stage opt $file --kernel attention"
$einfuse emit --stage opt $file --kernel attention | tee "$work/optimized.ein"
echo
echo "== the textbook cascade and the optimized one on the interpreter (M = 300: not a multiple of the tile)"
$einfuse run $file --kernel attention --bind M=300 --bind P=16 --seed 1 --output "AV=$work/written.npy"
$einfuse run "$work/optimized.ein" --bind M=300 --bind P=16 --seed 1 --output "AV=$work/optimized.npy"
if cmp -s "$work/written.npy" "$work/optimized.npy"; then
  echo "identical outputs"
else
  # Rounding may differ in the last place; show the summaries side by side.
  $einfuse run $file --kernel attention --bind M=300 --bind P=16 --seed 1
  $einfuse run "$work/optimized.ein" --bind M=300 --bind P=16 --seed 1
fi
echo
echo "== einfuse run $file --kernel attention --target cpu --bind M=300 --bind P=16 --seed 1 --check"
$einfuse run $file --kernel attention --target cpu --bind M=300 --bind P=16 --seed 1 --check
echo
echo "== einfuse bench $file --kernel attention --bind M=2048 --bind P=256 --runs 3"
$einfuse bench $file --kernel attention --bind M=2048 --bind P=256 --runs 3 --target both
echo
echo "== einfuse emit --stage ptx $file --kernel attention (the first lines)"
$einfuse emit --stage ptx $file --kernel attention | sed -n '5,20p'
echo "   ..."
echo
echo "== einfuse run $file --kernel attention --target gpu-emu --bind M=300 --bind P=16 --seed 1 --check"
$einfuse run $file --kernel attention --target gpu-emu --bind M=300 --bind P=16 --seed 1 --check
