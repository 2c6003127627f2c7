#!/usr/bin/env bash
# Prints the side-by-side table ours / PyTorch (median times, 2 threads, same shapes) used in
# PERFORMANCE.md. Installs torch into a virtualenv outside the repository on first use.
# Usage: scripts/compare_with_pytorch.sh [VENV_DIR]   (default: ../torch-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-../torch-venv}"
reference="../shared/bench/torch_reference.py"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch numpy
fi
out="$(mktemp -d)"
cargo build --release --example speed_table
THREADS=2 "$venv/bin/python" "$reference" bench "$out/torch.json" >/dev/null
RAYON_NUM_THREADS=2 ./target/release/examples/speed_table "$out/torch.json"
