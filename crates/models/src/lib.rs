#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]

pub mod alloc;
mod bf16;
mod concat;
#[cfg(feature = "cuda")]
mod cuda_layers;
#[cfg(feature = "cuda")]
mod cudnn;
#[cfg(feature = "cuda")]
mod cudnn_pool;
pub mod deeplab;
mod direct;
pub mod error;
mod fused;
pub mod init;
mod interp;
pub mod layers;
pub mod modules;
pub mod monai;
pub mod network;
pub mod ops3d;
mod patches;
mod pool;
pub mod precision;
pub mod unet;
pub mod unetr;
pub mod vnet;
mod vol2col;
pub mod weights;

pub use deeplab::{DeepLabV3, DeepLabV3Config};
pub use error::{ModelError, Result};
pub use init::seeded_var_builder;
pub use network::{Description, MODEL_NAMES, ModelConfig, Network, describe, training_bytes};
pub use precision::{Precision, bf16_available, precision, set_precision};
pub use unet::{Norm, UNet, UNetConfig};
pub use unetr::{Unetr, UnetrConfig, UnetrNorm};
pub use vnet::{VNet, VNetActivation, VNetConfig};
