#!/usr/bin/env bash
# run.sh of the GPU benchmark bundle (built by scripts/gpu_bundle; this file is its source).
# Times every burn-pooling layer, forward and forward+backward, on the GPU through wgpu, with
# the crate's kernels and the portable composite path side by side, next to PyTorch on CUDA
# when this box has it, and rates GAP's and GeM's forward in GB/s.
#
#   ./run.sh [--bandwidth-gbs X] [--quick] [--no-torch] [--no-measure] [--bundled-loader]
#     --bandwidth-gbs X   the card's memory bandwidth (GB/s) to rate GAP and GeM against
#     --quick             3 timed runs per op after 1 warm-up (a dry run)
#     --no-torch          skip PyTorch even if it has CUDA
#     --no-measure        skip Burn's peak-bandwidth probe of the adapter
#     --bundled-loader    use the bundled Vulkan loader even where the box has one
#   PYTHON=/path/to/python ./run.sh   picks the python that has torch (default python3)
#
# Needs no Rust and no network. Without a Vulkan loader on the box it unpacks the bundled
# libvulkan1 package into a private prefix and uses it through LD_LIBRARY_PATH; without an
# NVIDIA ICD manifest but with the NVIDIA driver's libGLX_nvidia.so.0 it writes one there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bench_args=(--device wgpu --path both)
quick=()
torch=1
measure=1
bundled_loader=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bandwidth-gbs) bench_args+=(--bandwidth-gbs "${2:?--bandwidth-gbs needs a value}"); shift ;;
    --quick) quick=(--quick) ;;
    --no-torch) torch=0 ;;
    --no-measure) measure=0 ;;
    --bundled-loader) bundled_loader=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see ./run.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$measure" = 1 ] && bench_args+=(--measure-bandwidth)
python="${PYTHON:-python3}"

if [ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]; then
  echo "run.sh: the bundle's binary is for x86-64 Linux, this is $(uname -s)/$(uname -m)" >&2
  exit 1
fi

# A private prefix for what the box lacks: under the bundle when it is writable, else /tmp.
prefix="$here/.runtime"
mkdir -p "$prefix" 2>/dev/null && [ -w "$prefix" ] || prefix="$(mktemp -d /tmp/burn-pooling-runtime.XXXXXX)"

has_loader() {
  { /sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null || true; } | grep -q 'libvulkan\.so\.1 '
}

# Unpacks a .deb's data into $2: dpkg -x where dpkg exists, else python3 (ar + tar).
unpack_deb() {
  if command -v dpkg >/dev/null; then
    dpkg -x "$1" "$2"
  else
    "$python" - "$1" "$2" <<'EOF'
import io, sys, tarfile
deb, dest = sys.argv[1], sys.argv[2]
data = open(deb, "rb").read()
assert data[:8] == b"!<arch>\n", f"{deb}: not an ar archive"
at = 8
while at < len(data):
    name = data[at:at + 16].decode().strip().rstrip("/")
    size = int(data[at + 48:at + 58].decode().strip())
    body = data[at + 60:at + 60 + size]
    if name.startswith("data.tar"):
        if name.endswith(".zst"):
            sys.exit(f"{deb}: {name} needs zstd or dpkg to unpack")
        tarfile.open(fileobj=io.BytesIO(body)).extractall(dest)
        break
    at += 60 + size + (size % 2)
EOF
  fi
}

echo "== Vulkan"
if has_loader && [ "$bundled_loader" = 0 ]; then
  echo "loader: the system's libvulkan.so.1"
else
  deb="$(ls "$here"/debs/libvulkan1_*.deb 2>/dev/null | head -1)"
  [ -n "$deb" ] || { echo "run.sh: no Vulkan loader on this box and none in debs/" >&2; exit 1; }
  unpack_deb "$deb" "$prefix/root"
  lib="$(dirname "$(find "$prefix/root" -name 'libvulkan.so.1' | head -1)")"
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if has_loader; then why="--bundled-loader"; else why="none on this box"; fi
  echo "loader: $why; using $(basename "$deb") unpacked in $lib"
fi
manifests=()
for dir in ${XDG_CONFIG_HOME:-$HOME/.config}/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d /usr/share/vulkan/icd.d; do
  for file in "$dir"/*.json; do [ -e "$file" ] && manifests+=("$file"); done
done
echo "driver manifests: ${manifests[*]:-none}"
if ! printf '%s\n' ${manifests[@]+"${manifests[@]}"} | grep -qi nvidia \
  && { /sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null || true; } | grep -q 'libGLX_nvidia\.so\.0 '; then
  mkdir -p "$prefix/icd.d"
  cat >"$prefix/icd.d/nvidia_icd.json" <<'EOF'
{ "file_format_version": "1.0.1", "ICD": { "library_path": "libGLX_nvidia.so.0", "api_version": "1.3" } }
EOF
  export VK_ICD_FILENAMES="${VK_ICD_FILENAMES:+$VK_ICD_FILENAMES:}$prefix/icd.d/nvidia_icd.json"
  echo "driver manifests: none for NVIDIA, but libGLX_nvidia.so.0 is here; wrote $prefix/icd.d/nvidia_icd.json"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/nvidia-smi: /' || true

# The speed table travels xz-compressed; unpack it once into the prefix.
table="$here/speed_table"
if [ ! -x "$table" ]; then
  table="$prefix/speed_table"
  if [ ! -x "$table" ] || [ "$here/speed_table.xz" -nt "$table" ]; then
    if command -v xz >/dev/null; then
      xz -dc "$here/speed_table.xz" >"$table.part"
    else
      "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$here/speed_table.xz" "$table.part"
    fi
    chmod +x "$table.part" && mv "$table.part" "$table"
  fi
fi

results="$prefix/results"
mkdir -p "$results"
torch_json=()
echo
echo "== PyTorch"
if [ "$torch" = 0 ]; then
  echo "skipped (--no-torch)"
elif "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  "$python" "$here/torch_reference.py" bench "$results/torch.json" --device cuda ${quick[@]+"${quick[@]}"}
  torch_json=("$results/torch.json")
else
  echo "skipped: $python has no torch with CUDA (PYTHON=... picks another python)"
fi

echo
echo "== burn-pooling on wgpu: kernels and composite path"
"$table" ${torch_json[@]+"${torch_json[@]}"} "${bench_args[@]}" ${quick[@]+"${quick[@]}"} | tee "$results/table.md"
echo
echo "(the table is also in $results/table.md)"
