//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong building, running, saving or loading a network.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A configuration value outside its domain.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// An input whose size the network cannot take.
    #[error("input of spatial size {size:?}: {reason}")]
    InputSize {
        /// `[d, h, w]`.
        size: Vec<usize>,
        /// Why not.
        reason: String,
    },
    /// A weights file that does not match the network.
    #[error("{}: {message}", path.display())]
    Weights {
        /// The file.
        path: PathBuf,
        /// Which tensors are missing, extra or of the wrong shape.
        message: String,
    },
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
