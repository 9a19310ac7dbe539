//! With the `cuda` feature: compiles `src/cuda/loss_sums.cu` to PTX with the CUDA toolkit's
//! `nvcc` (`$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`) for compute capability
//! `$CUDA_COMPUTE_CAP` (default 90: H100/H200), as candle's own kernels are built. Without the
//! feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/cuda/loss_sums.cu");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(out.join("loss_sums.ptx"))
        .arg("src/cuda/loss_sums.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed ({s}) on src/cuda/loss_sums.cu", nvcc.display()),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc to compile src/cuda/loss_sums.cu: {} ({e}); set NVCC \
             or CUDA_HOME (scripts/build-cuda.sh does)",
            nvcc.display()
        ),
    }
}
