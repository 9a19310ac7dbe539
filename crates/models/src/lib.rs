#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]

pub mod layers;
pub mod modules;
pub mod ops3d;
mod vol2col;
