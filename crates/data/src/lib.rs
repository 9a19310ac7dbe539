#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]
// a library reports through return values and `tracing`, never by printing (tests may print)
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod augment;
pub mod crop;
pub mod dataset;
pub mod error;
pub mod intensity;
pub mod loader;
pub mod npy;
pub mod output;
pub mod phantom;
pub mod resample;
pub mod sampling;
pub mod sliding;
pub mod volume;

pub use augment::{AugmentConfig, Augmentation, augment};
pub use crop::{BoundingBox, crop_image, crop_label, foreground_bbox, pad_or_crop, slabs};
pub use dataset::{
    AMOS_CLASSES, BRATS_MODALITIES, Case, Dataset, Split, brats_modality, is_brats_case,
    list_folder, stack_channels, write_phantom_dataset,
};
pub use error::{DataError, Result};
pub use intensity::{
    ForegroundIntensities, IntensityProperties, Normalization, foreground_voxels_per_case,
    normalize, percentile, zscore,
};
pub use loader::{Batch, BatchParts, EpochLoader, LoaderConfig, draw_batch};
pub use phantom::{Anatomy, COMPACT_PHANTOM_CLASSES, PHANTOM_CLASSES, PhantomConfig, phantom};
pub use resample::{
    Interpolation, resample_image, resample_image_to, resample_label, resample_label_to,
};
pub use sampling::{Patch, PatchMaps, SKELETON_HALO, SamplerConfig, SamplingVolume};
pub use sliding::{Blender, argmax, gaussian_importance, window_positions};
pub use volume::{
    Geometry, Image, LabelMap, ReadOptions, from_canonical, read_image, read_label, write_label,
    write_volume,
};
