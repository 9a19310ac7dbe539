//! The crate's error type.

/// Everything that can go wrong in `cwseg-morphology`; every variant names the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MorphologyError {
    /// A cube structuring element needs a side of at least one voxel.
    #[error("the cube structuring element needs a side of at least 1 voxel, got {0}")]
    CubeSide(usize),
    /// Erosion and dilation need at least one iteration.
    #[error("the number of iterations must be at least 1, got 0")]
    ZeroIterations,
    /// The spacing has the wrong number of entries for the array's rank.
    #[error("spacing has {got} entries but the array has {expected} axes")]
    SpacingRank {
        /// The array's number of axes.
        expected: usize,
        /// The number of spacing entries given.
        got: usize,
    },
    /// A spacing entry is zero, negative or not finite.
    #[error("spacing must be finite and positive on every axis, got {0:?}")]
    Spacing(Vec<f64>),
    /// The connectivity does not exist for the array's rank (e.g. 26 in 2D).
    #[error(
        "{neighbours}-connectivity does not exist in {rank}D (use 4 or 8 in 2D, 6, 18 or 26 in 3D)"
    )]
    Connectivity {
        /// The number of neighbours asked for.
        neighbours: usize,
        /// The array's number of axes.
        rank: usize,
    },
    /// A label is negative or too large to be a class index.
    #[error("label {0} is not a class index (labels must be integers in 0..K)")]
    Label(i128),
    /// The contour of the background class was asked for, but the map excluded the background.
    #[error(
        "the contour map was built with include_background = false, so it holds no contour for the background class"
    )]
    BackgroundExcluded,
    /// A numeric parameter is out of its range.
    #[error("parameter `{name}` must be {expected}, got {value}")]
    Parameter {
        /// The parameter's name.
        name: &'static str,
        /// What the parameter must be.
        expected: &'static str,
        /// The value given.
        value: f64,
    },
}

/// The crate's result type.
pub type Result<T, E = MorphologyError> = std::result::Result<T, E>;
