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
//! On CUDA (feature `cuda`), bf16 and f16 cast the inputs of every convolution, transposed
//! convolution and matrix product ([`crate::layers::matmul`], [`crate::layers::linear`]: UNETR's
//! attention and MLP) to bf16 or f16, which cuDNN and cuBLAS multiply on tensor cores with f32
//! accumulation, and cast the result back, as PyTorch's autocast does: parameters, gradients,
//! normalisations, softmax, the loss and the optimizer state stay f32. f16 is a CUDA
//! precision only; its narrow range (gradients below 6·10⁻⁸ flush to zero) is what the
//! trainer's dynamic loss scaling is for (`cwseg_train::optim::LossScaler`).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Device};

/// Arithmetic precision of convolutions (and, on CUDA, matrix products).
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
    /// f16 inputs (rounded to nearest even), f32 accumulation and f32 results: CUDA only.
    F16,
}

impl Precision {
    /// The name used on the command line and in model cards.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// Whether convolutions on `device` compute in this precision: f32 everywhere, bf16 on
    /// CUDA devices (cuDNN on tensor cores, in builds with the `cuda` feature) and CPUs where
    /// [`bf16_available`], f16 on CUDA devices only.
    pub fn available_on(self, device: &Device) -> bool {
        match self {
            Precision::F32 => true,
            Precision::Bf16 => device.is_cuda() || bf16_available(),
            Precision::F16 => device.is_cuda(),
        }
    }

    /// The element type products are computed in: `None` for f32, else bf16 or f16.
    pub fn narrow_dtype(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(DType::BF16),
            Precision::F16 => Some(DType::F16),
        }
    }

    /// What this precision needs, for the warning of a fallback to f32.
    pub fn requirement(self) -> &'static str {
        match self {
            Precision::F32 => "nothing",
            Precision::Bf16 => "a GPU or a CPU with AMX-BF16 (and Linux ≥ 5.16)",
            Precision::F16 => "a GPU (a `cuda` build)",
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
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            other => Err(format!("precision {other:?}: expected f32, bf16 or f16")),
        }
    }
}

/// The process's convolution precision (0: f32, 1: bf16, 2: f16).
static CONV_PRECISION: AtomicU8 = AtomicU8::new(0);

/// Whether this machine's CPU computes bf16 convolutions: an x86-64 CPU with AMX-BF16 whose
/// operating system grants this process the tile state (Linux ≥ 5.16).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::direct::amx_available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Sets the convolution precision of the process for convolutions on `device` and returns the
/// one in effect: `requested` where it is [`Precision::available_on`] `device`, f32 elsewhere.
/// CPU convolutions of a process set to bf16 for CUDA run in f32 where the CPU has no
/// AMX-BF16; of a process set to f16, always in f32.
pub fn set_precision(requested: Precision, device: &Device) -> Precision {
    let effective = if requested.available_on(device) {
        requested
    } else {
        Precision::F32
    };
    CONV_PRECISION.store(effective as u8, Ordering::Relaxed);
    effective
}

/// The convolution precision in effect.
pub fn precision() -> Precision {
    match CONV_PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Bf16,
        2 => Precision::F16,
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
        assert_eq!("fp16".parse::<Precision>(), Ok(Precision::F16));
        assert!("f8".parse::<Precision>().is_err());
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
    }

    #[test]
    fn f16_falls_back_to_f32_on_the_cpu() {
        let previous = precision();
        assert!(!Precision::F16.available_on(&Device::Cpu));
        assert_eq!(set_precision(Precision::F16, &Device::Cpu), Precision::F32);
        assert_eq!(precision(), Precision::F32);
        set_precision(previous, &Device::Cpu);
    }
}
