#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]

pub mod ops3d;
mod vol2col;
