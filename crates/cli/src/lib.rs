//! The library behind the `cwseg` command: argument handling, printing, the demo, benchmarks
//! and the hub client over `cwseg-train` (training, prediction, experiments). `main.rs` parses
//! arguments and calls [`commands`].

pub mod bench;
pub mod commands;
pub mod demo;
pub mod hub;
pub mod progress;
