#!/usr/bin/env bash
# Prints the side-by-side table ours / PyTorch (median times, 2 threads, same shapes) used in
# PERFORMANCE.md: scripts/torch_reference.py on the CPU, then examples/speed_table.rs on Flex.
# Installs torch into a virtualenv outside the repository on first use.
# Usage: scripts/compare_with_pytorch.sh [VENV_DIR] [SPEED_TABLE_OPTIONS...]
#   (default VENV_DIR: ../torch-venv; e.g. `-- --path both` adds the composite path's columns)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-../torch-venv}"
shift || true
[ "${1:-}" = "--" ] && shift
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch numpy
fi
out="$(mktemp -d)"
cargo build --release --example speed_table
THREADS=2 "$venv/bin/python" scripts/torch_reference.py bench "$out/torch.json" >/dev/null
# `cargo run` finds the binary wherever the target directory is (CARGO_TARGET_DIR, config).
RAYON_NUM_THREADS=2 cargo run -q --release --example speed_table -- "$out/torch.json" "$@"
