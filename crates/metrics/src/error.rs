//! The crate's error type.

/// Everything that can go wrong in `cwseg-metrics`; every variant names the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Prediction and label differ in shape.
    #[error("prediction has shape {prediction:?} but the label has shape {label:?}")]
    Shape {
        /// The prediction's shape.
        prediction: Vec<usize>,
        /// The label's shape.
        label: Vec<usize>,
    },
    /// The spacing has the wrong length, a non-positive entry or one over 10^6 mm.
    #[error(
        "spacing {spacing:?} must have {rank} positive entries of at most 10^6 mm (in array axis order)"
    )]
    Spacing {
        /// The spacing given.
        spacing: Vec<f64>,
        /// The array's number of axes.
        rank: usize,
    },
    /// No class to evaluate.
    #[error("no class to evaluate: give at least one class or region")]
    NoClasses,
    /// A class set names a label that cannot be a class index.
    #[error("class `{class}` names label {label}; labels must be in 0..65536")]
    Label {
        /// The class set's name.
        class: String,
        /// The offending label.
        label: i64,
    },
    /// An NSD tolerance is negative or not finite.
    #[error("class `{class}` has NSD tolerance {value} mm; it must be finite and non-negative")]
    Tolerance {
        /// The class set's name.
        class: String,
        /// The tolerance given.
        value: f64,
    },
    /// Reports over several runs need the same classes in each.
    #[error("run `{run}` has classes {got:?}, the first run has {expected:?}")]
    ClassesDiffer {
        /// The run whose classes differ.
        run: String,
        /// The first run's classes.
        expected: Vec<String>,
        /// This run's classes.
        got: Vec<String>,
    },
    /// From the morphology crate (edges and distance transforms).
    #[error(transparent)]
    Morphology(#[from] cwseg_morphology::MorphologyError),
}

/// The crate's result type.
pub type Result<T, E = MetricsError> = std::result::Result<T, E>;
