//! The crate's error type.

/// Everything that can go wrong in `cwseg-losses`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LossError {
    /// Logits must be `(N, K, D, H, W)` and labels `(N, D, H, W)` of the same `N, D, H, W`.
    #[error(
        "logits have shape {logits:?} and labels {labels:?}; expected (N, K, D, H, W) and (N, D, H, W)"
    )]
    Shape {
        /// The logits' shape.
        logits: Vec<usize>,
        /// The labels' shape.
        labels: Vec<usize>,
    },
    /// A map given with the target has the wrong shape.
    #[error("the {map} map has shape {got:?}, expected {expected:?}")]
    MapShape {
        /// Which map.
        map: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// The shape it must have.
        expected: Vec<usize>,
    },
    /// A label is negative or not below the number of classes.
    #[error("labels must be class indices in 0..{classes}, found {found}")]
    Label {
        /// The number of classes (channels of the logits).
        classes: usize,
        /// The offending label.
        found: i64,
    },
    /// Labels must be integers.
    #[error("labels must be an integer tensor (u8, u32 or i64), got {0:?}")]
    LabelType(candle_core::DType),
    /// A configuration value is out of range.
    #[error("loss `{loss}`: {what}")]
    Config {
        /// The loss.
        loss: &'static str,
        /// What is wrong.
        what: String,
    },
    /// An unknown loss name.
    #[error(
        "unknown loss `{0}`; known: ce, dl, gdl, dwce, cedl, cwce, sdl, cwcd, focal, tversky, dicefocal, boundary, cldice, dice_cldice, hausdorff_dt, log_hausdorff_dt, unified_focal, skeleton_recall, dice_ce_skeleton_recall"
    )]
    UnknownLoss(String),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From the morphology crate (CPU maps).
    #[error(transparent)]
    Morphology(#[from] cwseg_morphology::MorphologyError),
}

/// The crate's result type.
pub type Result<T, E = LossError> = std::result::Result<T, E>;
