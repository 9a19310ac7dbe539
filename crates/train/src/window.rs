//! Sliding-window settings: what overlapping windows blend and how they are weighted (recorded
//! in the model card, used by [`crate::predict`]).

use serde::{Deserialize, Serialize};

/// What overlapping windows blend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blend {
    /// The softmax probabilities of each window (cwseg's training validation and its models).
    #[default]
    Probabilities,
    /// The logits, with one softmax after blending (MONAI's `sliding_window_inference` and
    /// nnU-Net; imported MONAI models).
    Logits,
}

/// How each window's voxels are weighted in the blend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowWeights {
    /// The Gaussian importance map, σ = 0.125·window (MONAI `mode="gaussian"`, nnU-Net).
    #[default]
    Gaussian,
    /// Equal weights: the plain mean of overlapping windows (MONAI's default `mode="constant"`).
    Constant,
}

/// How a network's outputs become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// A softmax over the classes: one output per class.
    #[default]
    Softmax,
    /// A sigmoid per output: one output per region (region-based training).
    Sigmoid,
}

/// Sliding-window inference settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    /// Fraction of a window shared with its neighbour along each axis, in `[0, 1)`.
    pub overlap: f64,
    /// What is blended.
    pub blend: Blend,
    /// The window weights.
    pub weights: WindowWeights,
    /// Softmax over classes, or a sigmoid per region.
    pub activation: Activation,
    /// Test-time mirroring (nnU-Net's default): the mean of the probabilities of the 2³ flips
    /// of the input over its spatial axes, each flipped back.
    pub mirror: bool,
}

impl SlidingWindow {
    /// The same with a sigmoid per output when `regions`.
    pub fn with_regions(self, regions: bool) -> Self {
        SlidingWindow {
            activation: if regions {
                Activation::Sigmoid
            } else {
                Activation::Softmax
            },
            ..self
        }
    }

    /// Gaussian-weighted probabilities with `overlap`: what cwseg trains and validates with.
    pub fn probabilities(overlap: f64) -> Self {
        SlidingWindow {
            overlap,
            blend: Blend::Probabilities,
            weights: WindowWeights::Gaussian,
            activation: Activation::Softmax,
            mirror: false,
        }
    }
}

/// The largest sliding-window overlap inference takes: windows per window-sized region grow as
/// `1/(1 − overlap)³` (8 at 0.5, 1000 at 0.9).
pub const MAX_OVERLAP: f64 = 0.9;

/// Refuses an overlap outside `[0, MAX_OVERLAP]`; `field` names where it came from.
pub fn check_overlap(overlap: f64, field: &str) -> anyhow::Result<()> {
    if !(0.0..=MAX_OVERLAP).contains(&overlap) {
        anyhow::bail!(
            "{field} {overlap}: use a value in [0, {MAX_OVERLAP}] (windows per window-sized \
             region grow as 1/(1 − overlap)³: 8 at 0.5, 1000 at 0.9)"
        );
    }
    Ok(())
}
