//! For build scripts: compiles CUDA sources to PTX with the CUDA toolkit's `nvcc` (`$NVCC`,
//! else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`) for compute capability
//! `$CUDA_COMPUTE_CAP` (default 90: H100/H200), as candle's own kernels are built. The PTX of
//! `src/cuda/NAME.cu` is written as `$OUT_DIR/NAME.ptx`, for `include_str!`.
//!
//! Build scripts report failures by panicking (cargo prints the message), so these functions
//! panic with the file and the cause instead of returning errors.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles each of `sources` (paths relative to the crate's root) to PTX when the crate is
/// built with feature `feature`; without it, only tells cargo what to watch. Call from
/// `build.rs`.
pub fn ptx_if_feature(feature: &str, sources: &[&str]) {
    for source in sources {
        println!("cargo::rerun-if-changed={source}");
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let variable = format!("CARGO_FEATURE_{}", feature.to_uppercase().replace('-', "_"));
    if std::env::var_os(variable).is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for source in sources {
        compile(Path::new(source), &out);
    }
}

/// `nvcc --ptx` of `source` into `out/<stem>.ptx`.
fn compile(source: &Path, out: &Path) {
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let stem = source
        .file_stem()
        .unwrap_or_else(|| panic!("{}: not a file name", source.display()));
    let ptx = out.join(stem).with_extension("ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&ptx)
        .arg(source)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed ({s}) on {}", nvcc.display(), source.display()),
        Err(e) => panic!(
            "CUDA kernels need nvcc to compile {}: {} ({e}); set NVCC or CUDA_HOME \
             (scripts/gpu/build_cuda.sh does)",
            source.display(),
            nvcc.display()
        ),
    }
}
