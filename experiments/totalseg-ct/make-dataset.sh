#!/usr/bin/env bash
# Lays out the TotalSegmentator example CT of ../shared/data/totalseg-ct as an nnU-Net v2 data
# set in $1 (default /tmp/cwseg-totalseg-ct): symbolic links to the shared files and this
# folder's dataset.json, nothing copied. Run from the repository root.
set -euo pipefail
src=$(realpath ../shared/data/totalseg-ct)
out=${1:-/tmp/cwseg-totalseg-ct}
[ -f "$src/example_ct.nii.gz" ] || { echo "error: $src/example_ct.nii.gz not found" >&2; exit 1; }
mkdir -p "$out/imagesTr" "$out/labelsTr"
ln -sfn "$src/example_ct.nii.gz" "$out/imagesTr/ct_0000.nii.gz"
ln -sfn "$src/example_seg_full112_v1.nii.gz" "$out/labelsTr/ct.nii.gz"
cp experiments/totalseg-ct/dataset.json "$out/dataset.json"
echo "$out"
