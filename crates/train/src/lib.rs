#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]
// a library reports through return values, hooks and `tracing`, never by printing
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod bench;
pub mod calibrate;
pub mod card;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod contours;
pub mod cross_validation;
pub mod demo;
pub mod device;
pub mod distributed;
pub mod ensemble;
pub mod evaluate;
pub mod experiment;
pub mod export;
pub mod figures;
pub mod hub;
pub mod inputs;
pub mod interop;
pub mod memory;
pub mod optim;
pub mod outputs;
pub mod plan;
pub mod postprocess;
pub mod predict;
pub mod predict_files;
pub mod prepare;
pub mod regions;
pub mod shard;
pub mod trainer;
pub mod validate;
pub mod window;

pub use card::{ModelCard, load_model};
pub use config::{ContourMaps, TrainConfig, ValidationConfig};
pub use device::{parse_device, peak_gpu_memory, reset_peak_gpu_memory};
pub use distributed::{Communicator, Single};
pub use optim::{
    DynamicScaling, LossScaler, LossScaling, Optimizer, OptimizerConfig, OptimizerKind, Schedule,
};
pub use predict::{
    CasePrediction, PredictOptions, PreparedCase, predict_case, predict_probabilities,
};
pub use prepare::{
    DataConfig, DataFormat, PreparedData, Preprocessing, SyntheticConfig, open_data,
};
pub use regions::{RegionClasses, RegionConfig};
pub use shard::Shard;
pub use trainer::{
    EpochReport, Interrupted, NoHooks, RunOptions, RunStart, RunState, StepReport, TrainHooks,
    TrainOutcome, Trainer, train,
};
pub use window::{Activation, Blend, SlidingWindow, WindowWeights};

/// The error type of this crate: an [`anyhow::Error`] whose context chain names the file, case
/// or field at fault. [`Interrupted`] is the one cause callers match on (`downcast_ref`).
pub type Error = anyhow::Error;

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
