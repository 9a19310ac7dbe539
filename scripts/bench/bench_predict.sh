#!/usr/bin/env bash
# Whole-case prediction, cwseg against scripts/bench/predict_reference.py (nibabel, scipy, MONAI,
# PyTorch), f32 and bf16, two rounds in one run (BENCHMARKS.md, issue 19).
#
#   scripts/bench/bench_predict.sh MODEL CASES [CWSEG]
#
# MODEL: a model folder (e.g. models/brats18-unet-cedl); CASES: a folder of BraTS case folders;
# CWSEG: the binary (default target/release/cwseg). Needs a Python with torch, monai, nibabel,
# scipy and safetensors. Writes under ${TMPDIR:-/tmp}/bench-predict; prints wall time, user time
# and peak RSS of every process, then the voxels on which the four outputs disagree.
set -euo pipefail
model=$1 cases=$2 cwseg=${3:-target/release/cwseg}
out=${TMPDIR:-/tmp}/bench-predict
cd "$(dirname "$0")/../.."
date -u; lscpu | grep 'Model name'; git rev-parse --short HEAD
for round in 1 2; do
    for p in f32 bf16; do
        rm -rf "$out/cwseg-$p" "$out/ref-$p"
        echo "== round $round cwseg $p"
        /usr/bin/time -f "wall %e s user %U s maxrss %M KiB" "$cwseg" predict --model "$model" \
            --input "$cases" --output "$out/cwseg-$p" --no-postprocess --precision "$p"
        echo "== round $round reference $p"
        /usr/bin/time -f "wall %e s user %U s maxrss %M KiB" python scripts/bench/predict_reference.py \
            --model "$model" --input "$cases" --output "$out/ref-$p" --threads 2 --precision "$p"
    done
done
python - "$out" <<'PY'
import os, sys
import nibabel as nib
import numpy as np
out = sys.argv[1]
for a, b in [("cwseg-f32", "ref-f32"), ("cwseg-bf16", "ref-bf16"), ("cwseg-f32", "cwseg-bf16"),
             ("ref-f32", "ref-bf16")]:
    diff = total = 0
    for f in sorted(os.listdir(os.path.join(out, a))):
        x = np.asarray(nib.load(os.path.join(out, a, f)).dataobj)
        y = np.asarray(nib.load(os.path.join(out, b, f)).dataobj)
        diff += int((x != y).sum())
        total += x.size
    print(f"{a} vs {b}: {diff} of {total} voxels differ")
PY
date -u
