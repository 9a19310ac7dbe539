#!/usr/bin/env bash
# Builds with candle's `cuda` feature on a machine without CUDA (the recipe of
# ../shared/cuda/, adapted): nvcc 13.0 and the CUDA 13.0 libraries from PyPI wheels go into
# $W (default /tmp/cudabuild, never inside the repository), with link shims; it builds in
# $W/target with the `ci` profile (release without LTO) and installs into target/cuda/:
#   scripts/gpu/build_cuda.sh            # target/cuda/cwseg (a launcher) + target/cuda/cwseg-cuda
#   scripts/gpu/build_cuda.sh check      # also target/cuda/tests/{models,losses}-cuda and MONAI's
#                                    # wheel for gpu_check.sh (and target/cuda.tar.xz, about
#                                    # 20 MB, to carry there)
#   scripts/gpu/build_cuda.sh cargo ARGS # any cargo command in that environment
# Compute capability 9.0 (H100/H200). About 13 minutes cold on 2 cores.
# At run time the binaries need libcuda.so.1 (the driver), libcublas.so.13, libcudart.so.13,
# libcurand.so.10 (on the H100 machine: PyTorch's nvidia/cu13/lib) and libcudnn.so.9 (there:
# PyTorch's nvidia/cudnn/lib). The launcher target/cuda/cwseg says so in one line where they
# are missing, instead of the loader's error.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
W=${W:-/tmp/cudabuild}
mkdir -p "$W/linkstubs"
if [ ! -x "$W/venv/bin/python" ]; then
  python3 -m venv "$W/venv"
  "$W/venv/bin/pip" install -q --no-deps \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
NV=$("$W/venv/bin/python" -c 'import site;print(site.getsitepackages()[0])')/nvidia
if [ ! -f "$NV/cudnn/lib/libcudnn.so.9" ]; then
  # cuDNN 9 (about 1 GB unpacked): only for linking; at run time the GPU machine's own
  # cuDNN 9 (PyTorch's nvidia/cudnn/lib) is used.
  "$W/venv/bin/pip" install -q --no-deps nvidia-cudnn-cu13==9.28.1.4
fi
CU=$NV/cu13
for l in cudart cublas cublasLt nvrtc; do ln -sf "$CU/lib/lib$l.so.13" "$W/linkstubs/lib$l.so"; done
ln -sf "$CU/lib/libcurand.so.10" "$W/linkstubs/libcurand.so"
ln -sf "$NV/cudnn/lib/libcudnn.so.9" "$W/linkstubs/libcudnn.so"
cd "$ROOT"
cargo fetch
if [ ! -f "$W/linkstubs/libcuda.so" ]; then
  # A link-time stub of the driver (SONAME libcuda.so.1) exporting cudarc's entry points.
  REG=$(ls -d ~/.cargo/registry/src/*/ | head -1)
  CUDARC=$(ls -d "$REG"/cudarc-* | sort -V | tail -1)
  grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void){return 100;}"}' > "$W/linkstubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$W/linkstubs/libcuda.so" "$W/linkstubs/libcuda_stub.c"
fi
export CUDA_HOME=$CU NVCC=$CU/bin/nvcc PATH=$CU/bin:$PATH CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13000 LIBRARY_PATH=$W/linkstubs CARGO_TARGET_DIR=$W/target
if [ "${1:-}" = cargo ]; then
  shift
  exec cargo "$@"
fi
mode=${1:-cwseg}
cargo build -p cwseg-cli --features cuda --profile ci
INSTALL="$ROOT/target/cuda"
mkdir -p "$INSTALL"
install -m 755 "$W/target/ci/cwseg" "$INSTALL/cwseg-cuda"
strip "$INSTALL/cwseg-cuda"
cat > "$INSTALL/cwseg" <<'LAUNCHER'
#!/bin/sh
# cwseg built with CUDA. The binary links the NVIDIA driver library, the CUDA 13 runtime and cuDNN 9;
# where they are missing, one line says so (instead of the dynamic loader's error).
bin="$(dirname "$0")/cwseg-cuda"
missing=$(ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  echo "error: this cwseg was built with CUDA and needs ${missing% } (the NVIDIA driver, the CUDA 13 libraries and cuDNN 9; see the README's GPU section), not found here; use the CPU build (cargo build --release -p cwseg-cli) on this machine" >&2
  exit 1
fi
exec "$bin" "$@"
LAUNCHER
chmod 755 "$INSTALL/cwseg"
if [ "$mode" = check ]; then
  mkdir -p "$INSTALL/tests"
  for crate in models losses; do
    exe=$(cargo test -p "cwseg-$crate" --features cuda --profile ci --test cuda --no-run --message-format=json \
      | "$W/venv/bin/python" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])' | tail -1)
    install -m 755 "$exe" "$INSTALL/tests/$crate-cuda"
    strip "$INSTALL/tests/$crate-cuda"
  done
  # MONAI for the V-Net and UNETR references (the GPU machine's PyTorch has none): the pure-
  # Python wheel, which gpu_check.sh puts on PYTHONPATH.
  "$W/venv/bin/pip" download -q --no-deps -d "$INSTALL" monai==1.6.1
fi
# One archive to copy to the GPU machine (the PTX in the binaries compresses about 8×).
tar -C "$ROOT/target" -cJf "$ROOT/target/cuda.tar.xz" cuda
du -sh "$INSTALL" "$ROOT/target/cuda.tar.xz"
