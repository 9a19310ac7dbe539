//! A run's progress in the grid, `RUN/status.json`: read, written, and listed for every run.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::ExperimentConfig;
use crate::shard::Shard;

/// A run's progress, `RUN/status.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// `training`, `predicting` or `done`.
    pub state: String,
    /// Training wall time summed over the epochs of every invocation, seconds.
    pub train_seconds: f64,
    /// Test-set prediction wall time, seconds.
    pub predict_seconds: f64,
    /// Best validation DSC and its epoch.
    pub best_val_dice: Option<f64>,
    /// The epoch of the best checkpoint (the one tested).
    pub best_epoch: Option<usize>,
    /// The cwseg version that finished the run.
    pub cwseg_version: String,
}

/// The run's `status.json`: `None` where there is none (a run not started), an error naming the
/// file where it cannot be read or parsed (never taken for a pending run).
fn read_status(dir: &Path) -> Result<Option<RunStatus>> {
    let path = dir.join("status.json");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("{}: {e}", path.display()),
    };
    match serde_json::from_str(&text) {
        Ok(status) => Ok(Some(status)),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

/// Whether the run in `dir` has predicted its test cases.
pub(super) fn is_done(dir: &Path) -> Result<bool> {
    Ok(read_status(dir)?.is_some_and(|s| s.state == "done"))
}

pub(super) fn write_status(dir: &Path, status: &RunStatus) -> Result<()> {
    cwseg_data::dataset::write_atomic(
        &dir.join("status.json"),
        serde_json::to_string_pretty(status)?.as_bytes(),
    )?;
    Ok(())
}

pub(super) fn write_status_creating(dir: &Path, status: &RunStatus) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_status(dir, status)
}

/// Sum of the epoch times in `metrics.jsonl`.
pub(super) fn train_seconds(dir: &Path) -> f64 {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seconds"].as_f64())
        .sum()
}

/// Every run of the grid (of `shard`, if given), in training order, with its state (`pending`,
/// `training`, `predicting`, `done`, or `unreadable (FILE: reason)` for a `status.json` that
/// cannot be read) in `out` (default: the file's output folder).
pub fn list(
    config: &ExperimentConfig,
    out: Option<&Path>,
    shard: Option<Shard>,
) -> Vec<(String, String)> {
    let out = out.map_or_else(|| config.out_dir(), Path::to_path_buf);
    let runs = config.runs();
    let runs = match shard {
        Some(shard) => shard.select(runs),
        None => runs,
    };
    runs.iter()
        .map(|run| {
            let state = match read_status(&out.join("runs").join(run.key())) {
                Ok(status) => status.map_or_else(|| "pending".to_string(), |s| s.state),
                Err(e) => format!("unreadable ({e})"),
            };
            (run.key(), state)
        })
        .collect()
}
