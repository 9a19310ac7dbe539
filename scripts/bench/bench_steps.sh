#!/usr/bin/env bash
# The networks' training steps (batch 2, 1×64³, 16 classes, CE + Adam), cwseg against
# scripts/bench/bench_models_reference.py (PyTorch) in one run, f32 and bf16 (PyTorch: autocast), with
# each process' wall time and peak RSS (BENCHMARKS.md, issue 19).
#
#   [NETWORKS="segresnet dynunet"] [PRECISIONS=f32] scripts/bench/bench_steps.sh [CWSEG...]
#
# CWSEG: one or more `cwseg` binaries (default target/release/cwseg), e.g. a build of an earlier
# commit beside this one. Needs a Python with torch on PATH; 2 threads each side.
set -euo pipefail
cd "$(dirname "$0")/../.."
binaries=("${@:-target/release/cwseg}")
date -u; lscpu | grep 'Model name'; git rev-parse --short HEAD
for net in ${NETWORKS:-unet vnet deeplabv3 unetr segresnet dynunet swinunetr}; do
    for p in ${PRECISIONS:-f32 bf16}; do
        for b in "${binaries[@]}"; do
            echo "== $net $p $b"
            /usr/bin/time -f "peak RSS %M KiB" "$b" bench --step-only --step-loss ce \
                --step-network "$net" --precision "$p" 2>&1 | grep -E "training step|peak RSS"
        done
        echo "== $net $p pytorch"
        python scripts/bench/bench_models_reference.py --threads 2 --precision "$p" "$net" 2>&1 | tail -1
    done
done
date -u
