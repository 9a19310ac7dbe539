//! Resuming a run from `last/`: the configuration it must keep, the checkpoint read with its
//! digests checked, the checks of its card and state, and the restore into a network and an
//! optimizer.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_nn::VarMap;
use cwseg_models::weights;

use super::RunState;
use super::recorded::{Difference, differences, read_run_config};
use super::save::truncate_metrics;
use super::state::check_state;
use crate::card::ModelCard;
use crate::config::TrainConfig;
use crate::optim::Optimizer;

/// Checks that `config` may resume the run whose recorded configuration is `saved` (read from
/// `saved_path`); returns whether it extends the run (more epochs).
pub(super) fn check_resume(
    saved_path: &Path,
    saved: &TrainConfig,
    config: &TrainConfig,
) -> Result<bool> {
    let differing: Vec<String> = differences(saved, config)?
        .iter()
        .filter(|d| d.field != "epochs")
        .map(Difference::to_string)
        .collect();
    if !differing.is_empty() {
        bail!(
            "--resume: {} differ(s) from the run's {}; resume with the run's settings (only a larger --epochs extends it)",
            differing.join(", "),
            saved_path.display()
        );
    }
    if config.epochs < saved.epochs {
        bail!(
            "--resume: --epochs {} is fewer than the run's {}; a run can be extended, not shortened",
            config.epochs,
            saved.epochs
        );
    }
    Ok(config.epochs > saved.epochs)
}

/// The configuration a resumed run must keep and its file: the one saved in the checkpoint
/// (`last/train.toml`), or in checkpoints written before it was saved there, `RUN/train.toml`.
pub(super) fn resume_reference(dir: &Path) -> Result<(PathBuf, TrainConfig)> {
    let last = dir.join("last");
    let from = if last.join("train.toml").exists() {
        last
    } else {
        dir.to_path_buf()
    };
    Ok((from.join("train.toml"), read_run_config(&from)?))
}

/// A run's last checkpoint (`RUN/last/`) whose files match the digests recorded in it.
pub(super) struct LastCheckpoint {
    /// The folder.
    dir: PathBuf,
    /// Its model card (`config.json`).
    card: ModelCard,
    /// Its run state (`state.json`).
    state: RunState,
}

/// Reads `dir/last/`: its card and run state, with the weights and the optimizer state checked
/// against the SHA-256 that the card and the run state record (checkpoints written before a
/// digest was recorded are not checked). Loads nothing into a network.
pub(super) fn read_last(dir: &Path) -> Result<LastCheckpoint> {
    let last = dir.join("last");
    let card = ModelCard::read(&last)?;
    card.verify_weights(&last)?;
    let path = last.join("state.json");
    let state: RunState = serde_json::from_str(
        &fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a run state", path.display()))?;
    check_best_present(dir, &state, &path)?;
    if let Some(expected) = &state.optimizer_sha256 {
        let optimizer = last.join("optimizer.safetensors");
        let found = crate::card::sha256_file(&optimizer)?;
        if &found != expected {
            bail!(
                "{}: SHA-256 {found} is not the {expected} recorded in {} (a damaged or replaced optimizer state)",
                optimizer.display(),
                path.display()
            );
        }
    }
    Ok(LastCheckpoint {
        dir: last,
        card,
        state,
    })
}

/// Refuses to resume a run whose state (`state_path`) records a best epoch when `best/` lacks
/// a file that the end of training reads (its card and weights), naming the missing file:
/// otherwise the run would train on and fail only at the end.
fn check_best_present(dir: &Path, state: &RunState, state_path: &Path) -> Result<()> {
    let Some(epoch) = state.best_epoch else {
        return Ok(());
    };
    let best = dir.join("best");
    for file in ["config.json", "model.safetensors"] {
        let path = best.join(file);
        if !path.is_file() {
            bail!(
                "{} is missing, but {} records a best checkpoint (epoch {}); restore it, or train into a new folder",
                path.display(),
                state_path.display(),
                epoch
            );
        }
    }
    Ok(())
}

impl LastCheckpoint {
    /// Refuses to resume with `card` (this invocation's configuration on this data) where it
    /// differs from the checkpoint's in what cannot change within a run: the network, the loss,
    /// the patch, the preprocessing, the contour maps, the classes, their label values or the
    /// modalities; the error names them.
    pub(super) fn check_card(&self, card: &ModelCard) -> Result<()> {
        use serde_json::to_value as value;
        let fields = |c: &ModelCard| -> Result<[(&'static str, serde_json::Value); 9]> {
            Ok([
                ("model", value(&c.model)?),
                ("loss", value(&c.loss)?),
                ("patch", value(c.patch)?),
                ("preprocessing", value(c.preprocessing)?),
                ("contour_maps", value(c.contour_maps)?),
                ("classes", value(&c.classes)?),
                ("label_values", value(&c.label_values)?),
                ("modalities", value(&c.modalities)?),
                ("regions", value(&c.regions)?),
            ])
        };
        let (saved, given) = (fields(&self.card)?, fields(card)?);
        let differing: Vec<&str> = saved
            .iter()
            .zip(&given)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0)
            .collect();
        if !differing.is_empty() {
            bail!(
                "--resume: the {} of this configuration and data differ(s) from {}, what the checkpoint was trained with; resume with the run's own train.toml and data, or train into a new folder",
                differing.join(", "),
                self.dir.join("config.json").display()
            );
        }
        Ok(())
    }

    /// Loads the weights and the optimizer state into `vars` and `optimizer`, checks the run
    /// state against the optimizer's step count and cuts `run/metrics.jsonl` back to the saved
    /// epochs; a finished run given more epochs (`extended`) continues.
    pub(super) fn restore(
        self,
        run: &Path,
        vars: &VarMap,
        optimizer: &mut Optimizer,
        config: &TrainConfig,
        extended: bool,
    ) -> Result<RunState> {
        weights::load_strict(vars, self.dir.join("model.safetensors"))?;
        optimizer.load(&self.dir.join("optimizer.safetensors"))?;
        let mut state = self.state;
        check_state(
            &self.dir.join("state.json"),
            &state,
            config,
            optimizer.steps(),
        )?;
        truncate_metrics(&run.join("metrics.jsonl"), state.epoch)?;
        if state.finished && extended && state.epoch < config.epochs {
            state.finished = false;
        }
        Ok(state)
    }
}
