#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]
// a library reports through return values and `tracing`, never by printing (tests may print)
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod common;
mod composite;
mod compound;
mod config;
mod cross_entropy;
mod dice;
mod distance;
mod error;
pub mod regions;
mod skeleton_recall;
mod target;
mod topology;
mod unified_focal;

use candle_core::Tensor;

pub use compound::{Boundary, ContourWeightedDice, CrossEntropyDice, DiceFocal};
pub use config::{LOSS_NAMES, LossConfig};
pub use cross_entropy::{
    ContourWeightedCrossEntropy, CrossEntropy, DistanceWeightedCrossEntropy, Focal, Preset,
};
pub use dice::{Dice, GdlWeight, GeneralizedDice, SeparableDice, Tversky};
pub use distance::{HausdorffDt, LogHausdorffDt};
pub use error::{LossError, Result};
pub use regions::Regions;
pub use skeleton_recall::{DiceCeSkeletonRecall, SkeletonRecall};
pub use target::{
    BorderKind, ContourConfig, ElementKind, Kernels, Target, dwce_weights_cpu, edges_cpu,
    edges_online, signed_distance_cpu, skeleton_cpu,
};
pub use topology::{SoftClDice, SoftDiceClDice};
pub use unified_focal::UnifiedFocal;

/// A segmentation loss: a scalar from logits `(N, K, D, H, W)` (any float dtype, any
/// device) and a [`Target`]; differentiable with respect to the logits only.
pub trait Loss: Send + Sync {
    /// The loss's short name (`"cwcd"`).
    fn name(&self) -> &'static str;
    /// The loss value, a scalar tensor on the logits' device.
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor>;
}

/// A loss's value and the L2 norm of its gradient with respect to `logits`:
/// `(L, ‖∂L/∂z‖₂)`, both in f64 (0 for the norm when no gradient reaches the logits), as
/// `cwseg loss --json` reports them.
pub fn value_and_gradient_norm(
    loss: &dyn Loss,
    logits: &Tensor,
    target: &Target,
) -> Result<(f64, f64)> {
    let logits = candle_core::Var::from_tensor(logits)?;
    let value = loss.forward(logits.as_tensor(), target)?;
    let grads = value.backward()?;
    let norm = match grads.get(logits.as_tensor()) {
        Some(g) => g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?
            .sqrt(),
        None => 0.0,
    };
    let value = value
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    Ok((value, norm))
}
