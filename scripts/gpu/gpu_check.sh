#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and PyTorch (a few minutes):
#
#   scripts/gpu/build_cuda.sh check     # here, on any machine: target/cuda/ and target/cuda.tar.xz
#   scripts/gpu/gpu_check.sh [OUT]      # there, from the repository root, with either copied
#
# With the device tool, whose calls send at most 64 MiB (the tracked tree is about 100 MB):
#   here:  scripts/gpu/build_cuda.sh check; scripts/data/pack_brats.sh; commit; scripts/gpu/gpu_tree.sh slim
#   call:  scripts/gpu/gpu_check.sh $OUT               carry target/cuda.tar.xz       (< 10 min)
#   call:  scripts/gpu/gpu_brats_check.sh $OUT         carry target/brats18.tar.bz2   (the BraTS
#          training; target/cuda stays there from the first call; only with 6 minutes of
#          device time left, else in a later sitting; EPOCHS=3 halves it)
#   here:  give_back; scripts/gpu/gpu_tree.sh restore
#
# 1. CUDA against CPU, same inputs, 1e-4 relative: every 3D operation and layer (values and
#    gradients; the layer kernels also in bf16 and f16, 3e-2, and the bf16/f16 matrix products
#    of UNETR, 2e-2), every network's forward (eval and train) and input gradient, every loss.
# 2. The training steps of the four networks (batch 2, 1×96³, 16 classes, forward + loss +
#    backward + Adam, median of 5 after a warm-up) with cwseg on CUDA (cuDNN) against PyTorch
#    on the same GPU (cuDNN autotuner on, no TF32), in f32, bf16 and f16 (PyTorch: autocast; f16
#    with dynamic loss scaling on both sides), with peak GPU memory on both sides (cross-entropy
#    on both; cwseg's CWCD beside it).
# 3. `cwseg demo --quick --device cuda`, in f32, bf16 and f16.
# OUT (default $OUT, else gpu-check-out/) gets two files, as a device call brings back at most
# eight: summary.md and logs.tar.gz (every step's log; the demos' reports without their
# volumes and weights). Exit status: failed steps.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu-check-out}}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
mkdir -p "$OUT"
BIN=target/cuda
if [ ! -x "$BIN/cwseg-cuda" ] && [ -f target/cuda.tar.xz ]; then
  tar -C target -xJf target/cuda.tar.xz
fi
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"
failed=0

# PyTorch's Python, and its CUDA 13 libraries for the cwseg binaries.
PY=""
for candidate in ${PYTHON:-} /opt/torch/.venv/bin/python python3; do
  if [ -n "$candidate" ] && "$candidate" -c 'import torch' 2>/dev/null; then PY=$candidate; break; fi
done
if [ -n "$PY" ]; then
  NVLIB=$("$PY" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
  [ -n "$NVLIB" ] && export LD_LIBRARY_PATH="$NVLIB:${LD_LIBRARY_PATH:-}"
  # cuDNN 9 from PyTorch's wheels (nvidia/cudnn/lib beside nvidia/cu13/lib)
  CUDNNLIB=$("$PY" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cudnn", "lib"))' 2>/dev/null || true)
  [ -n "$CUDNNLIB" ] && [ -d "$CUDNNLIB" ] && export LD_LIBRARY_PATH="$CUDNNLIB:$LD_LIBRARY_PATH"
  # MONAI (V-Net, UNETR references) from the carried pure-Python wheel where it is missing
  if ! "$PY" -c 'import monai' 2>/dev/null; then
    MONAI_WHEEL=$(ls "$BIN"/monai-*.whl 2>/dev/null | head -1)
    [ -n "$MONAI_WHEEL" ] && export PYTHONPATH="$MONAI_WHEEL${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# Steps that would start after DEADLINE seconds (default 510: a device call runs at most 600)
# are skipped and counted as failed, so the summary and the logs are always written.
DEADLINE=${DEADLINE:-510}
step() { # step NAME TIMEOUT COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$SECONDS" -ge "$DEADLINE" ]; then
    echo "| $name | SKIPPED (past the ${DEADLINE} s deadline) | 0 s |" >> "$SUMMARY"
    failed=$((failed + 1))
    return
  fi
  [ $((SECONDS + limit)) -gt "$DEADLINE" ] && limit=$((DEADLINE - SECONDS + 30))
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$WORK/all.log"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  cat "$WORK/$name.log" >> "$WORK/all.log"
  local status=ok
  [ $rc -ne 0 ] && { status="FAILED (exit $rc)"; failed=$((failed + 1)); }
  echo "| $name | $status | $((SECONDS - start)) s |" >> "$SUMMARY"
  echo "   $status in $((SECONDS - start)) s"
}

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
  echo "PyTorch: ${PY:-none} $("${PY:-false}" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  echo
  echo "| step | result | wall |"
  echo "|---|---|---|"
} >> "$SUMMARY"

step ops-networks-parity 300 "$BIN/tests/models-cuda" --nocapture --test-threads 1
step losses-parity 300 "$BIN/tests/losses-cuda" --nocapture --test-threads 1
NETS=unet,vnet,deeplabv3,unetr
steps() { # steps PRECISION: both sides' training steps
  step "cwseg-steps-$1" 300 "$BIN/cwseg" bench --device cuda --step-only --step-size 96 \
    --step-network $NETS --step-loss ce,cwcd --precision "$1"
  if [ -n "$PY" ]; then
    step "pytorch-steps-$1" 300 "$PY" scripts/bench/bench_models_reference.py --device cuda --size 96 \
      --precision "$1" $NETS
  fi
}
demo() { # demo PRECISION
  step "demo-quick-$1" 300 "$BIN/cwseg" demo --quick --device cuda --precision "$1" --quiet \
    --out "$WORK/demo-$1"
}
# the most wanted first: should the deadline come, f16 is what is left out
steps f32
steps bf16
demo f32
demo bf16
steps f16
demo f16

{
  echo
  echo "## Figures"
  echo
  grep -h "max relative difference" "$WORK/ops-networks-parity.log" 2>/dev/null \
    | awk '{print $NF, $0}' | sort -g | tail -3 | cut -d' ' -f2- | sed 's/^/worst op\/network parity: /'
  grep -h "gradient max rel" "$WORK/losses-parity.log" 2>/dev/null | sed 's/^/loss parity: /'
  if grep -h "skipped" "$WORK/ops-networks-parity.log" "$WORK/losses-parity.log" 2>/dev/null \
      | sed 's/^/SKIPPED (counted as a failure: the GPU was not usable): /' | grep .; then
    failed=$((failed + 1))
  fi
  grep -h "training step" "$WORK"/cwseg-steps-*.log 2>/dev/null
  grep -h "training step on" "$WORK"/pytorch-steps-*.log 2>/dev/null
  for d in demo-quick-f32 demo-quick-bf16 demo-quick-f16; do
    grep -h "^| Avg\|training time" "$WORK/$d.log" 2>/dev/null | sed "s/^/$d: /"
  done
  echo
  echo "failed steps: $failed"
} >> "$SUMMARY"
tar -czf "$OUT/logs.tar.gz" --exclude='*.nii.gz' --exclude='*.safetensors' --exclude='*.npy' \
  -C "$WORK" .
cat "$SUMMARY"
exit "$failed"
