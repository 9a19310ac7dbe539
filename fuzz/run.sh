#!/usr/bin/env bash
# The long fuzz runs: `fuzz/run.sh TARGET [RUNS]` (targets: nifti, npy, configs, model_folder, run_configs; RUNS default
# 1000000).
# cargo-fuzz needs nightly-only compiler flags (sanitizers, coverage); this machine has one
# stable toolchain and fetches no other, so RUSTC_BOOTSTRAP=1 lets the stable compiler take them.
# Prints libFuzzer's summary; a crash leaves its input in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: fuzz/run.sh nifti|npy|configs|model_folder|run_configs [RUNS]}"
runs="${2:-1000000}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
mkdir -p "fuzz/corpus/$target"
# seeds: the NIfTI test fixtures, the committed .npy files
case "$target" in
  nifti) cp -n crates/data/tests/fixtures/*.nii "fuzz/corpus/$target/" ;;
  npy) cp -n fuzz/seeds/npy/*.npy "fuzz/corpus/$target/" ;;
  configs) cp -n fuzz/seeds/configs/* "fuzz/corpus/$target/" ;;
  model_folder) cp -n fuzz/seeds/model_folder/* "fuzz/corpus/$target/" ;;
  run_configs)
    cp -n experiments/totalseg-ct/*.toml "fuzz/corpus/$target/"
    for m in models/*/; do cp -n "$m/config.json" "fuzz/corpus/$target/$(basename "$m").json"; done ;;
esac
# a model folder's seed (a tiny U-Net's config and weights) is 4.8 KB
max_len=4096
[ "$target" = model_folder ] && max_len=8192
RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" --release -- -runs="$runs" -max_len="$max_len" \
    -print_final_stats=1 "fuzz/corpus/$target"
