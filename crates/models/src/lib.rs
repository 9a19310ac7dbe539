#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]
// a library reports through return values and `tracing`, never by printing (tests may print)
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod deeplab;
pub mod dynunet;
pub mod error;
pub mod init;
pub mod modules;
pub mod monai;
mod monai_args;
pub mod network;
pub mod segresnet;
pub mod swinunetr;
pub mod unet;
pub mod unetr;
pub mod vnet;
pub mod weights;

// The operations the networks are built of live in `cwseg-ops` (every kernel and custom op, and
// all the `unsafe` code); re-exported here so that `cwseg_models::ops3d` and the rest keep
// their paths.
pub use cwseg_ops::{
    Precision, alloc, bf16_available, concat, layers, ops3d, precision, set_precision,
};

pub use deeplab::{DeepLabV3, DeepLabV3Config};
pub use dynunet::{DynUNet, DynUNetConfig, DynUNetNorm};
pub use error::{ModelError, Result};
pub use init::seeded_var_builder;
pub use network::{Description, MODEL_NAMES, ModelConfig, Network, describe, training_bytes};
pub use segresnet::{SegResNet, SegResNetConfig, SegResNetUpsample};
pub use swinunetr::{SwinUnetr, SwinUnetrConfig};
pub use unet::{Norm, UNet, UNetConfig};
pub use unetr::{Unetr, UnetrConfig, UnetrNorm};
pub use vnet::{VNet, VNetActivation, VNetConfig};
