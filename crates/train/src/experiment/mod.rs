//! `cwseg experiment`: a grid of networks × losses × seeds on one data set. Every run is a
//! folder with its own `status.json`, so the grid resumes where it stopped (over several
//! sessions); finished runs predict the split's test cases on their own grid, and the tables
//! (Markdown and CSV, mean ± std over seeds, paper and MONAI aggregation, HD95) and a figure are
//! made from the predictions on disk.

mod collect;
mod config;
mod figure;
mod pooled;
mod runner;
mod scoring;
mod status;
mod tables;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub use config::{ExperimentConfig, Regions, RunKey, TableSpec};
pub use status::{RunStatus, list};
pub use tables::{TABLE_CSV_HEADER, TableRow, table_rows};

use crate::shard::Shard;
use crate::trainer::TrainHooks;
use collect::collect;
use runner::run_one;
use status::is_done;

/// Options of one invocation.
#[derive(Debug, Clone, Default)]
pub struct ExperimentOptions {
    /// Output folder instead of the file's.
    pub out: Option<PathBuf>,
    /// Only make the tables from the runs already done.
    pub collect: bool,
    /// Train only this shard's runs (every N-th in training order) and make no tables: one
    /// job of an array; `collect` once every shard is done.
    pub shard: Option<Shard>,
}

/// Trains and predicts every run not yet done (`hooks` watch each training), then writes the
/// tables; returns the Markdown.
pub fn run(
    config: &ExperimentConfig,
    options: &ExperimentOptions,
    hooks: &mut dyn TrainHooks,
) -> Result<String> {
    let out = options.out.clone().unwrap_or_else(|| config.out_dir());
    let runs_dir = out.join("runs");
    if options.collect {
        // before anything is written: a mistyped --out must not become a folder of NaN tables
        check_some_done(config, &runs_dir)?;
    }
    // before experiment.toml records this grid's protocol
    config.check_recorded_runs(&runs_dir)?;
    fs::create_dir_all(&runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;
    cwseg_data::dataset::write_atomic(
        &out.join("experiment.toml"),
        toml::to_string_pretty(config)?.as_bytes(),
    )?;
    let data_dir = out.join("data");
    if options.collect {
        return collect(config, &out, &data_dir);
    }
    let runs = config.runs();
    let shard = options.shard.unwrap_or(Shard::ALL);
    for (i, run) in runs.iter().enumerate() {
        let dir = runs_dir.join(run.key());
        if !shard.contains(i) || is_done(&dir)? {
            continue;
        }
        tracing::info!("run {}/{}: {}", i + 1, runs.len(), run.key());
        run_one(config, run, &dir, &data_dir, hooks)?;
    }
    match options.shard {
        None => collect(config, &out, &data_dir),
        Some(shard) => Ok(format!(
            "shard {shard}: its runs are done in {}; make the tables with --collect once every shard is done\n",
            out.display()
        )),
    }
}

/// Refuses to tabulate when no run of the grid is done in `runs_dir` (a mistyped `--out`, or
/// nothing trained yet); an unreadable `status.json` is an error naming it.
fn check_some_done(config: &ExperimentConfig, runs_dir: &Path) -> Result<()> {
    let runs = config.runs();
    let mut done = 0;
    for run in &runs {
        if is_done(&runs_dir.join(run.key()))? {
            done += 1;
        }
    }
    if done == 0 {
        bail!(
            "0 of {} runs done in {}; nothing to tabulate",
            runs.len(),
            runs_dir.display()
        );
    }
    Ok(())
}
