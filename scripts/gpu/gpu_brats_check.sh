#!/usr/bin/env bash
# The BraTS part of the GPU check (issue 18): a U-Net trained on the 12 shared BraTS 2018 cases
# at 1 mm on CUDA for a few hundred steps, whose validation DSC must rise.
#
#   scripts/data/pack_brats.sh                     # here: target/brats18.tar.bz2 (about 55 MB)
#   scripts/gpu/gpu_brats_check.sh [OUT]          # there, after gpu_check.sh unpacked target/cuda
#
# The data travels in its own device call (carry target/brats18.tar.bz2, with the tree slimmed
# by scripts/gpu/gpu_tree.sh); target/cuda stays on the machine from the call of gpu_check.sh.
# Settings (environment): DEVICE (cuda), PRECISION (bf16), EPOCHS (6), BATCHES (50 per epoch),
# PATCH (96), LOSS (cwcd), BIN (target/cuda/cwseg), DATA (where the archive is unpacked).
# 10 cases train, 2 validate (seeded split); preprocessing: crop to the brain, 1 mm, z-score
# of the brain's voxels. OUT gets brats-summary.txt and brats-logs.tar.gz (configuration,
# training log, metrics.jsonl), the run folder stays in /tmp. Exit status 0 when the last validation DSC is at least RISE (0.05)
# above the first epoch's.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu-brats-out}}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
EPOCHS=${EPOCHS:-6}
BATCHES=${BATCHES:-50}
PATCH=${PATCH:-96}
LOSS=${LOSS:-cwcd}
BIN=${BIN:-target/cuda/cwseg}
DATA=${DATA:-/tmp/cwseg-brats18}
RISE=${RISE:-0.05}
WORK=$(mktemp -d /tmp/gpu-brats.XXXXXX)
mkdir -p "$OUT"
if [ ! -d "$DATA/brats18" ]; then
  mkdir -p "$DATA"
  tar -C "$DATA" -xjf target/brats18.tar.bz2 || { echo "no target/brats18.tar.bz2" >&2; exit 1; }
  find "$DATA/brats18" -name '*.nii' -print0 | xargs -0 -P "$(nproc)" -n 4 gzip -1
fi
cat > "$WORK/brats-1mm.toml" <<TOML
patch = [$PATCH, $PATCH, $PATCH]
batch_size = 2
epochs = $EPOCHS
batches_per_epoch = $BATCHES
seed = 0
contour_maps = "volume"
device = "$DEVICE"
precision = "$PRECISION"

[data]
source = "$DATA/brats18"
format = "brats"
val_fraction = 0.2
test_fraction = 0.0

[data.preprocessing]
crop_foreground = true
spacing = [1.0, 1.0, 1.0]
normalization = { kind = "z_score_non_zero" }

[model]
name = "unet"

[loss]
name = "$LOSS"

[validation]
postprocess = false
TOML
start=$SECONDS
"$BIN" train --config "$WORK/brats-1mm.toml" --out "$WORK/run" --quiet > "$WORK/train.log" 2>&1
rc=$?
wall=$((SECONDS - start))
cp "$WORK/run/metrics.jsonl" "$WORK/" 2>/dev/null
tar -czf "$OUT/brats-logs.tar.gz" -C "$WORK" brats-1mm.toml train.log $(cd "$WORK" && ls metrics.jsonl 2>/dev/null)
tail -5 "$WORK/train.log"
[ $rc -ne 0 ] && { echo "training failed (exit $rc) after $wall s" | tee "$OUT/brats-summary.txt"; exit 1; }
python3 - "$WORK/run/metrics.jsonl" "$wall" "$EPOCHS" "$BATCHES" "$RISE" <<'PY' | tee "$OUT/brats-summary.txt"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
dice = [l["val_dice"] for l in lines if l.get("val_dice") is not None]
wall, steps = int(sys.argv[2]), int(sys.argv[3]) * int(sys.argv[4])
print("validation DSC by epoch:", " ".join(f"{d:.4f}" for d in dice))
print("loss by epoch:", " ".join(f"{l['loss']:.4f}" for l in lines))
print(f"{steps} steps in {wall} s (validation and checkpoints included)")
rise = float(sys.argv[5])
rose = len(dice) >= 2 and dice[-1] >= dice[0] + rise
print(f"validation DSC rose by {dice[-1] - dice[0]:+.4f}: " + ("ok" if rose else f"FAILED (needs {rise:+.2f})"))
sys.exit(0 if rose else 1)
PY
rc=${PIPESTATUS[0]}
exit "$rc"
