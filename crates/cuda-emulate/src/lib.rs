//! Test support: cwseg's CUDA kernel files compiled for the CPU, loaded as a shared library.
//!
//! [`emulation`] compiles a harness of `harness/` (which includes one kernel file) with
//! `include/cuda_shim.h`, once per process, and returns it locked: the emulated grid and block
//! sizes and `__shared__` arrays are process-wide, and C++ `inline` variables are unique across
//! loaded libraries, so one launch runs at a time. The harnesses' C functions are reached with
//! [`Emulation::function`]. See the README for what the emulation does and does not check.
// Loading a library and calling into it is FFI.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Why an emulation could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    /// The compiler ran and failed on the harness (a kernel file that is not valid C++ for the
    /// shim, or a harness out of step with it).
    #[error("{compiler} failed on {harness} ({status})")]
    Compile {
        /// The compiler.
        compiler: String,
        /// The harness.
        harness: String,
        /// Its exit status.
        status: String,
    },
    /// Reading or writing the kernel file, or loading the built library.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Which kernel file to emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// `crates/ops/src/cuda/layers.cu` through `harness/layers.cpp`: `emu_activation`,
    /// `emu_prelu`, `emu_norm`, `emu_softmax`.
    Layers,
    /// `crates/ops/src/cuda/loss_sums.cu` through `harness/loss_sums.cpp`: `emu_loss_sums`.
    LossSums,
}

/// A built emulation.
#[derive(Debug)]
pub struct Emulation {
    library: libloading::Library,
    _dir: tempfile::TempDir,
}

impl Emulation {
    /// The harness's C function `name`.
    ///
    /// # Safety
    /// `T` must be the function pointer type of `name`'s C signature in the harness.
    pub unsafe fn function<T: Copy>(&self, name: &[u8]) -> Result<T, EmulationError> {
        // SAFETY: the caller vouches for `T`.
        let symbol = unsafe { self.library.get::<T>(name) }.map_err(|e| EmulationError::Io {
            what: format!("symbol {}", String::from_utf8_lossy(name)),
            source: Box::new(e),
        })?;
        Ok(*symbol)
    }
}

/// The emulation of `kernels`, built on first use and locked while the guard lives; `None`
/// where no C++ compiler starts (`$CXX`, else `g++`).
pub fn emulation(
    kernels: Kernels,
) -> Result<Option<MutexGuard<'static, Emulation>>, EmulationError> {
    static LOCK: Mutex<()> = Mutex::new(());
    static LAYERS: OnceLock<Option<Mutex<Emulation>>> = OnceLock::new();
    static LOSS_SUMS: OnceLock<Option<Mutex<Emulation>>> = OnceLock::new();
    let cell = match kernels {
        Kernels::Layers => &LAYERS,
        Kernels::LossSums => &LOSS_SUMS,
    };
    // one build at a time, and `get_or_init` cannot carry an error out
    let built = {
        let _building = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        match cell.get() {
            Some(built) => built,
            None => {
                let emulation = build(kernels)?.map(Mutex::new);
                cell.get_or_init(|| emulation)
            }
        }
    };
    Ok(built
        .as_ref()
        .map(|m| m.lock().unwrap_or_else(|e| e.into_inner())))
}

/// The crate's folder.
fn here() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles the harness of `kernels` into a temporary folder and loads it.
fn build(kernels: Kernels) -> Result<Option<Emulation>, EmulationError> {
    let io = |what: String| {
        move |e: std::io::Error| EmulationError::Io {
            what,
            source: Box::new(e),
        }
    };
    let dir = tempfile::tempdir().map_err(io("a temporary folder".into()))?;
    let mut defines = Vec::new();
    let harness = match kernels {
        Kernels::Layers => here().join("harness/layers.cpp"),
        Kernels::LossSums => {
            let source = here().join("../ops/src/cuda/loss_sums.cu");
            let text = std::fs::read_to_string(&source)
                .map_err(io(format!("reading {}", source.display())))?;
            let rewritten = dir.path().join("loss_sums.cu");
            std::fs::write(&rewritten, dynamic_shared(&text))
                .map_err(io(format!("writing {}", rewritten.display())))?;
            defines.push(format!("-DLOSS_SUMS_CU=\"{}\"", rewritten.display()));
            here().join("harness/loss_sums.cpp")
        }
    };
    let library = dir.path().join("emulation.so");
    let compiler = std::env::var_os("CXX").map_or_else(|| PathBuf::from("g++"), PathBuf::from);
    let status = Command::new(&compiler)
        .args([
            "-std=c++20",
            "-O2",
            "-fPIC",
            "-shared",
            "-pthread",
            "-x",
            "c++",
            "-I",
        ])
        .arg(here().join("include"))
        .args(["-include", "cuda_shim.h"])
        .args(&defines)
        .arg(&harness)
        .arg("-o")
        .arg(&library)
        .status();
    let status = match status {
        Ok(status) => status,
        Err(_) => return Ok(None),
    };
    if !status.success() {
        return Err(EmulationError::Compile {
            compiler: compiler.display().to_string(),
            harness: harness.display().to_string(),
            status: status.to_string(),
        });
    }
    // SAFETY: the library was just built from a harness; loading it runs only the C++
    // runtime's initialisers.
    let library =
        unsafe { libloading::Library::new(&library) }.map_err(|e| EmulationError::Io {
            what: format!("loading {}", library.display()),
            source: Box::new(e),
        })?;
    Ok(Some(Emulation { library, _dir: dir }))
}

/// `extern __shared__ T name[];` (dynamic shared memory, which no macro can express) as
/// `T* name = emu_dynamic_shared<T>();` of `cuda_shim.h`.
fn dynamic_shared(source: &str) -> String {
    source
        .lines()
        .map(|line| {
            let trimmed = line.trim();
            match trimmed
                .strip_prefix("extern __shared__ ")
                .and_then(|rest| rest.strip_suffix("[];"))
                .and_then(|decl| decl.split_once(' '))
            {
                Some((ty, name)) => {
                    let indent = &line[..line.len() - line.trim_start().len()];
                    format!("{indent}{ty}* {name} = emu_dynamic_shared<{ty}>();")
                }
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_shared_arrays_become_the_shims_buffer() {
        let source = "__device__ void f() {\n  extern __shared__ double sh[];\n  sh[0] = 1;\n}";
        assert_eq!(
            dynamic_shared(source),
            "__device__ void f() {\n  double* sh = emu_dynamic_shared<double>();\n  sh[0] = 1;\n}"
        );
    }
}
