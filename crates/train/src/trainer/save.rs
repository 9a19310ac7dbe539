//! What a run writes besides its progress: the checkpoints (`last/`, `best/`: weights, card,
//! and for `last/` the optimizer, `state.json` and `train.toml`), the run's record
//! (`train.toml`, `split.json`) and `metrics.jsonl`.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use cwseg_models::weights;

use super::recorded::recorded_config;
use super::{RunState, Trainer};
use crate::card::ModelCard;
use crate::config::TrainConfig;
use crate::optim::Optimizer;

/// What a checkpoint that can be resumed holds besides the weights and the card.
pub(super) struct Resumable<'a> {
    /// The optimizer (`optimizer.safetensors`).
    optimizer: &'a Optimizer,
    /// The run state (`state.json`, with the optimizer file's digest added).
    state: &'a RunState,
    /// The run's configuration (`train.toml`: what these weights were trained with).
    config: &'a TrainConfig,
}

/// Writes the checkpoint folder `dir` (weights, card, and with `resumable` the optimizer, run
/// state and configuration) as a whole ([`crate::checkpoint::replace`]).
pub(super) fn save_checkpoint(
    dir: &Path,
    vars: &VarMap,
    card: &ModelCard,
    resumable: Option<Resumable>,
) -> Result<()> {
    let metadata: HashMap<String, String> = [
        ("cwseg_version".to_string(), card.cwseg_version.clone()),
        ("model".to_string(), card.model.name().to_string()),
        ("loss".to_string(), serde_json::to_string(&card.loss)?),
    ]
    .into_iter()
    .collect();
    crate::checkpoint::replace(dir, |tmp| {
        let weights_path = tmp.join("model.safetensors");
        weights::save(vars, &weights_path, DType::F32, &metadata)?;
        let card = card.with_weights_digest(&weights_path)?;
        cwseg_data::dataset::write_atomic(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&card)?.as_bytes(),
        )?;
        if let Some(r) = resumable {
            let optimizer_path = tmp.join("optimizer.safetensors");
            r.optimizer.save(&optimizer_path)?;
            let state = RunState {
                optimizer_sha256: Some(crate::card::sha256_file(&optimizer_path)?),
                ..r.state.clone()
            };
            cwseg_data::dataset::write_atomic(
                &tmp.join("state.json"),
                serde_json::to_string_pretty(&state)?.as_bytes(),
            )?;
            cwseg_data::dataset::write_atomic(
                &tmp.join("train.toml"),
                toml::to_string_pretty(r.config)?.as_bytes(),
            )?;
        }
        Ok(())
    })
}

/// Keeps the lines of `metrics.jsonl` of the epochs before `epochs` (a run killed after an
/// epoch's line but before its checkpoint repeats that epoch on resume).
pub(super) fn truncate_metrics(path: &Path, epochs: usize) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["epoch"].as_u64())
                .is_some_and(|e| e as usize <= epochs)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        cwseg_data::dataset::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// Records the run in its folder once it is known to open (rank 0, after the checkpoint of a
/// resumed run has loaded): `train.toml`, then `split.json` unless it is recorded already; a
/// new run (started again after it was killed before its first checkpoint) starts an empty
/// `metrics.jsonl`.
pub(super) fn record_run(
    dir: &Path,
    config: &TrainConfig,
    card: &ModelCard,
    split: &cwseg_data::Split,
    resume: bool,
) -> Result<()> {
    cwseg_data::dataset::write_atomic(
        &dir.join("train.toml"),
        toml::to_string_pretty(&recorded_config(config, card))?.as_bytes(),
    )?;
    let split_path = dir.join("split.json");
    if !split_path.exists() {
        split.write(&split_path)?;
    }
    if !resume {
        truncate_metrics(&dir.join("metrics.jsonl"), 0)?;
    }
    Ok(())
}

/// `dir/metrics.jsonl`, opened for appending.
pub(super) fn open_metrics(dir: &Path) -> Result<fs::File> {
    let path = dir.join("metrics.jsonl");
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

impl Trainer {
    /// Writes `last/` (weights, card, optimizer and run state) as a whole (rank 0; the other
    /// ranks hold the same).
    pub fn save_last(&self) -> Result<()> {
        if !self.is_rank0() {
            return Ok(());
        }
        save_checkpoint(
            &self.dir.join("last"),
            &self.vars,
            &self.card,
            Some(Resumable {
                optimizer: &self.optimizer,
                state: &self.state,
                config: &recorded_config(&self.config, &self.card),
            }),
        )
    }
}
