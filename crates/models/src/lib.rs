#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]

pub mod error;
pub mod layers;
pub mod modules;
pub mod network;
pub mod ops3d;
pub mod unet;
mod vol2col;
pub mod weights;

pub use error::{ModelError, Result};
pub use network::{Description, MODEL_NAMES, ModelConfig, Network, describe};
pub use unet::{Norm, UNet, UNetConfig};
