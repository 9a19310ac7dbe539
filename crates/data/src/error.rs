//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `cwseg-data`; variants about files name the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// Reading or writing a file failed (missing, unreadable, truncated or corrupt gzip ...).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system or decoder said.
        source: std::io::Error,
    },
    /// A NIfTI file that cannot be read as a volume: bad header, impossible dims or datatype,
    /// data shorter than the header says.
    #[error("{}: {message}", path.display())]
    Nifti {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A volume larger than the configured memory cap; refused before allocating.
    #[error("{}: the volume needs {bytes} bytes, more than the cap of {cap} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Bytes the decoded volume would need.
        bytes: u64,
        /// The cap.
        cap: u64,
    },
    /// A label volume with a value that is not a class index in `0..=255`.
    #[error("{}: label value {value} at voxel [z={}, y={}, x={}] is not a class index in 0..=255", path.display(), voxel[0], voxel[1], voxel[2])]
    LabelValue {
        /// The file.
        path: PathBuf,
        /// The offending value.
        value: f64,
        /// Where it is, `[z, y, x]`.
        voxel: [usize; 3],
    },
    /// Two volumes that must match do not (image and label, the modalities of one case).
    #[error("{}: shape {got:?} does not match {expected:?} of {}", path.display(), reference.display())]
    ShapeMismatch {
        /// The file that differs.
        path: PathBuf,
        /// Its shape `[z, y, x]`.
        got: Vec<usize>,
        /// The file it is compared with.
        reference: PathBuf,
        /// That file's shape.
        expected: Vec<usize>,
    },
    /// A data set folder or its `dataset.json` / split file is not as expected.
    #[error("{}: {message}", path.display())]
    Dataset {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `.npy` file that is not one, or whose header and data disagree.
    #[error("{}: {message}", path.display())]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An argument outside its domain (a zero patch size, an overlap of 1 ...).
    #[error("{0}")]
    Invalid(String),
    /// From the morphology crate (contour maps of patches).
    #[error(transparent)]
    Morphology(#[from] cwseg_morphology::MorphologyError),
    /// From candle, at the tensor boundary.
    #[cfg(feature = "candle")]
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn nifti(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Nifti {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn dataset(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Dataset {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
