#!/usr/bin/env bash
# Regenerates docs/gallery.md and its pictures (docs/gallery/*.svg) from examples/.
# Installs Graphviz (for `dot`) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dot >/dev/null 2>&1; then
  echo "== installing graphviz"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq graphviz >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq graphviz >/dev/null; fi
fi
cargo build --quiet --bin einfuse
rm -rf docs/gallery
target/debug/einfuse gallery --examples examples --out docs
for f in docs/gallery/*.dot; do
  dot -Tsvg "$f" -o "${f%.dot}.svg"
  rm "$f"
done
echo "docs/gallery.md and $(ls docs/gallery/*.svg | wc -l) SVG files written"
