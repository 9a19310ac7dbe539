//! The library behind the `cwseg` command: argument handling, printing, progress and the
//! benchmarks over `cwseg-train` (training, prediction, experiments, the demo, export and the
//! hub client). `main.rs` parses arguments and calls [`commands`].

pub mod bench;
pub mod commands;
pub mod progress;
