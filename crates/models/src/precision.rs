//! The arithmetic precision of convolutions: f32, or bf16 inputs with f32 accumulation where
//! the CPU multiplies bf16 tiles (AMX-BF16, granted by the operating system). Like PyTorch's
//! `torch.set_float32_matmul_precision`, one setting for the process, read when a
//! convolution is built (its backward pass keeps the precision of its forward pass).
//!
//! In bf16, the unit-stride convolutions that take the direct path (`direct.rs`) round their
//! operands to bf16 (round to nearest even) and accumulate in f32: input and weights in the
//! forward pass, output gradient and weights for the input gradient, input and output gradient
//! for the weight gradient. Strided and transposed convolutions, matmuls, norms, the loss and
//! the optimizer stay in f32, and so do parameters and activations (stored as f32).
//!
//! On CUDA (feature `cuda`), bf16 casts the inputs of every convolution and transposed
//! convolution to bf16, which cuDNN multiplies on tensor cores with f32 accumulation, and casts
//! the result back: parameters, gradients and the optimizer state stay f32.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Device;

/// Arithmetic precision of convolutions.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 inputs, f32 accumulation.
    #[default]
    F32,
    /// bf16 inputs (rounded to nearest even), f32 accumulation and f32 results.
    Bf16,
}

impl Precision {
    /// The name used on the command line and in model cards.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!(
                "precision {other:?}: expected f32 or bf16 (f16 is a CUDA precision, not built)"
            )),
        }
    }
}

/// The process's convolution precision (0: f32, 1: bf16).
static CONV_PRECISION: AtomicU8 = AtomicU8::new(0);

/// Whether this machine's CPU computes bf16 convolutions: an x86-64 CPU with AMX-BF16 whose
/// operating system grants this process the tile state (Linux ≥ 5.16).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::direct::amx_available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether convolutions on `device` compute in bf16: CUDA devices (cuDNN on tensor cores, in
/// builds with the `cuda` feature) and CPUs where [`bf16_available`].
pub fn bf16_available_on(device: &Device) -> bool {
    device.is_cuda() || bf16_available()
}

/// Sets the convolution precision of the process for convolutions on `device` and returns the
/// one in effect: bf16 only where [`bf16_available_on`], f32 everywhere else. CPU convolutions
/// of a process set to bf16 for CUDA run in f32 where the CPU has no AMX-BF16.
pub fn set_precision(requested: Precision, device: &Device) -> Precision {
    let effective = match requested {
        Precision::Bf16 if bf16_available_on(device) => Precision::Bf16,
        _ => Precision::F32,
    };
    CONV_PRECISION.store(effective as u8, Ordering::Relaxed);
    effective
}

/// The convolution precision in effect.
pub fn precision() -> Precision {
    match CONV_PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Bf16,
        _ => Precision::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("F32".parse::<Precision>(), Ok(Precision::F32));
        assert!("f16".parse::<Precision>().is_err());
        assert_eq!(Precision::Bf16.to_string(), "bf16");
    }
}
