#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]
// a library reports through return values and `tracing`, never by printing (tests may print)
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod alloc;
mod attention;
mod bf16;
pub mod concat;
#[cfg(feature = "cuda")]
mod cuda_layers;
#[cfg(feature = "cuda")]
mod cudnn;
#[cfg(feature = "cuda")]
mod cudnn_pool;
mod direct;
mod fused;
mod interp;
mod layer_norm;
pub mod layers;
pub mod loss_sums;
#[cfg(feature = "cuda")]
pub mod loss_sums_cuda;
#[cfg(test)]
mod loss_sums_emulated;
pub mod ops3d;
mod patches;
mod pool;
pub mod precision;
mod tiles;
mod vol2col;

pub use precision::{Precision, bf16_available, precision, set_precision};
