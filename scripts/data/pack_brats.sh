#!/usr/bin/env bash
# Packs the shared BraTS 2018 cases for the GPU machine, which does not see ../shared:
# target/brats18.tar.bz2 (bzip2 compresses the int16 volumes to about 4.6 MB a case against
# gzip's 7.5 MB, so the 12 cases take about 55 MB: one device call carries them beside the
# slimmed tree of scripts/gpu/gpu_tree.sh, not beside the 21 MB CUDA bundle as well).
#
#   scripts/data/pack_brats.sh [N]     # the first N cases (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=../shared/data/brats18
N=${1:-0}
mapfile -t cases < <(ls "$SRC")
[ "$N" -gt 0 ] && cases=("${cases[@]:0:$N}")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/brats18" target
for c in "${cases[@]}"; do
  mkdir "$TMP/brats18/$c"
  for f in "$SRC/$c"/*.nii.gz; do
    gzip -dc "$f" > "$TMP/brats18/$c/$(basename "$f" .gz)"
  done
done
tar -C "$TMP" -cf - brats18 | bzip2 -9 > target/brats18.tar.bz2.partial
mv target/brats18.tar.bz2.partial target/brats18.tar.bz2
echo "target/brats18.tar.bz2: ${#cases[@]} cases, $(stat -c %s target/brats18.tar.bz2) bytes"
