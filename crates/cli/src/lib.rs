//! The library behind the `cwseg` command: run configurations, training, prediction, the
//! experiment grid, figures and the hub client. `main.rs` parses arguments and calls
//! [`commands`]. (Issue 22 moves training and prediction into their own crate.)

pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod compare;
pub mod demo;
pub mod experiment;
pub mod figures;
pub mod hub;
pub mod infer;
pub mod interop;
pub mod optim;
pub mod postprocess;
pub mod prepare;
pub mod train;
