#!/usr/bin/env bash
# The demonstration: check softmax attention, print its Cascade IR, and run both forms of it (the
# textbook 3-pass cascade and the 1-pass FlashAttention-style cascade) on the reference
# interpreter with the same random inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --bin einfuse
einfuse=target/debug/einfuse
file=examples/attention.ein

echo "== einfuse check $file"
$einfuse check $file
echo
echo "== einfuse emit --stage ir $file --kernel attention"
$einfuse emit --stage ir $file --kernel attention
echo
summaries=()
for kernel in attention attention_1pass; do
  echo "== einfuse run $file --kernel $kernel --target interp --bind M=300 --bind P=16 --seed 1"
  summary=$($einfuse run $file --kernel $kernel --target interp --bind M=300 --bind P=16 --seed 1)
  echo "$summary"
  summaries+=("$summary")
done
echo
if [ "${summaries[0]}" = "${summaries[1]}" ]; then
  echo "The 3-pass and the 1-pass cascade agree (M = 300 is not a multiple of the tile M0 = 64)."
else
  echo "The two cascades disagree!" >&2
  exit 1
fi
