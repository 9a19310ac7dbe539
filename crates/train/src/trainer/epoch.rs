//! The epochs of a run: each epoch's batches, its validation, its checkpoints and
//! `metrics.jsonl` line, early stopping, and at the end the post-processing and `curves.png`.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use cwseg_data::EpochLoader;
use serde_json::json;

use super::finish::decide_postprocessing;
use super::save::save_checkpoint;
use super::{EpochReport, RunStart, StepReport, TrainHooks, TrainOutcome, Trainer};
use crate::distributed;
use crate::validate::{case_dice, mean_foreground};

impl Trainer {
    /// Trains the remaining epochs; at the end decides the post-processing on the validation
    /// cases (recorded in `best/config.json`) and writes `curves.png`. A hook that stops the
    /// run leaves `last/` to resume from and an outcome with `interrupted` set.
    pub fn run(mut self, hooks: &mut dyn TrainHooks) -> Result<TrainOutcome> {
        let start = Instant::now();
        let per_epoch = self.config.batches_per_epoch as u64;
        hooks.started(&RunStart {
            name: format!("{} {}", self.card.model.name(), self.loss.name()),
            total_steps: self.config.epochs as u64 * per_epoch,
            done_steps: self.state.epoch as u64 * per_epoch + self.state.batch as u64,
        });
        if self.state.finished {
            tracing::info!("the run had finished; nothing to do");
        }
        let mut interrupted = false;
        while self.state.epoch < self.config.epochs && !self.state.finished {
            let lr = self.config.schedule.lr(
                self.config.optimizer.lr,
                self.state.epoch,
                self.config.epochs,
            );
            self.optimizer.set_lr(lr);
            let epoch_start = Instant::now();
            let first = self.state.batch;
            if !self.train_epoch(lr, hooks)? {
                self.save_last()?;
                interrupted = true;
                break;
            }
            let report = self.end_epoch(lr, first, epoch_start.elapsed().as_secs_f64())?;
            hooks.epoch(&report);
        }
        if !interrupted && self.is_rank0() {
            decide_postprocessing(&self.dir, &self.val_cases, &self.config, &self.device)?;
            crate::figures::write_curves(
                &self.dir.join("metrics.jsonl"),
                &self.dir.join("curves.png"),
            )?;
        }
        let outcome = TrainOutcome {
            dir: self.dir.clone(),
            best_dice: self.state.best_dice,
            interrupted,
            seconds: start.elapsed().as_secs_f64(),
        };
        hooks.finished(&outcome, &self.state);
        Ok(outcome)
    }

    /// The batches left in the current epoch, each one optimizer step; `false` when a hook
    /// stopped the epoch before its end.
    fn train_epoch(&mut self, lr: f64, hooks: &mut dyn TrainHooks) -> Result<bool> {
        let epoch_start = Instant::now();
        let first = self.state.batch;
        let loader = EpochLoader::starting_at(
            Arc::clone(&self.volumes),
            self.loader.clone(),
            self.config.seed,
            self.state.epoch as u64,
            first,
        );
        for batch in loader {
            let loss = self.step(&batch?)?;
            let patches = (self.state.batch - first) * self.config.batch_size;
            hooks.step(&StepReport {
                epoch: self.state.epoch,
                epochs: self.config.epochs,
                batch: self.state.batch,
                loss,
                mean_loss: self.state.loss_sum / self.state.batch as f64,
                lr,
                patches_per_second: patches as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9),
                best_dice: self.state.best_dice,
            });
            if distributed::any(&*self.comm, hooks.should_stop())? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// After the last batch of an epoch: validation when due, `best/` when it improved, the
    /// `metrics.jsonl` line, the run state and `last/`.
    fn end_epoch(&mut self, lr: f64, first_batch: usize, seconds: f64) -> Result<EpochReport> {
        let epoch = self.state.epoch;
        let last_epoch = epoch + 1 == self.config.epochs;
        let due = (epoch + 1).is_multiple_of(self.config.validation.every.max(1)) || last_epoch;
        let validation = if due { self.validate()? } else { None };
        let (val_dice, per_class) = validation.unzip();
        let improved = match (val_dice, self.state.best_dice) {
            (Some(d), Some(b)) => d.is_finite() && d > b,
            (Some(d), None) => d.is_finite(),
            (None, _) => self.val_cases.is_empty() && last_epoch,
        };
        distributed::check_replicas(&*self.comm, &self.vars)?;
        if improved {
            self.state.best_dice = val_dice;
            self.state.best_epoch = Some(epoch + 1);
            if self.is_rank0() {
                save_checkpoint(&self.dir.join("best"), &self.vars, &self.card, None)?;
            }
        }
        let patches = (self.config.batches_per_epoch - first_batch) * self.config.batch_size;
        let report = EpochReport {
            epoch: epoch + 1,
            loss: self.state.loss_sum / self.state.batch.max(1) as f64,
            lr,
            val_dice,
            val_dice_per_class: per_class,
            seconds,
            patches_per_second: patches as f64 / seconds.max(1e-9),
            improved,
            stalled: false,
        };
        self.write_metrics(&report)?;
        self.state.epoch += 1;
        self.state.batch = 0;
        self.state.loss_sum = 0.0;
        let stalled = self
            .config
            .validation
            .patience
            .zip(self.state.best_epoch)
            .is_some_and(|(patience, best)| self.state.epoch >= best + patience);
        self.state.finished = self.state.epoch == self.config.epochs || stalled;
        self.save_last()?;
        tracing::info!(epoch = epoch + 1, loss = report.loss, val_dice = %show_dice(val_dice), "epoch done");
        if stalled {
            tracing::info!(
                best_epoch = self.state.best_epoch.unwrap_or_default(),
                "validation DSC has not improved for {} epochs; stopped early",
                self.config.validation.patience.unwrap_or_default()
            );
        }
        Ok(EpochReport { stalled, ..report })
    }

    /// Appends an epoch's line to `metrics.jsonl` (rank 0): its report, and with loss scaling
    /// the scale and the steps skipped so far.
    fn write_metrics(&mut self, report: &EpochReport) -> Result<()> {
        let finite = |d: f64| d.is_finite().then_some(d);
        let mut line = json!({
            "epoch": report.epoch,
            "loss": report.loss,
            "lr": report.lr,
            "val_dice": report.val_dice.and_then(finite),
            "val_dice_per_class": report.val_dice_per_class.as_ref().map(|v| v.iter().map(|&d| finite(d)).collect::<Vec<_>>()),
            "seconds": report.seconds,
            "patches_per_second": report.patches_per_second,
        });
        if let Some(scaler) = &self.scaler {
            line["loss_scale"] = json!(scaler.scale());
            line["skipped_steps"] = json!(self.state.skipped_steps);
        }
        if let Some(metrics) = &mut self.metrics {
            writeln!(metrics, "{line}").context("writing metrics.jsonl")?;
        }
        Ok(())
    }

    /// Mean foreground DSC and per-class DSC of the validation cases (`None` without any);
    /// with several ranks each predicts every `size`-th case and the table is reduced.
    pub fn validate(&self) -> Result<Option<(f64, Vec<f64>)>> {
        if self.val_cases.is_empty() {
            return Ok(None);
        }
        let (rank, size, k) = (self.comm.rank(), self.comm.size(), self.classes);
        let mut table = vec![0.0f64; self.val_cases.len() * k];
        for (i, case) in self.val_cases.iter().enumerate() {
            if i % size == rank {
                let dice = case_dice(
                    &self.network,
                    case,
                    &self.card,
                    self.config.validation.overlap,
                    &self.device,
                )?;
                table[i * k..(i + 1) * k].copy_from_slice(&dice);
            }
        }
        self.comm.all_reduce_sum_f64(&mut table)?;
        let per_case: Vec<Vec<f64>> = table.chunks(k).map(<[f64]>::to_vec).collect();
        Ok(Some(mean_foreground(&per_case)))
    }
}

/// A validation DSC for the log: the number, or `-` for an epoch without validation.
fn show_dice(dice: Option<f64>) -> String {
    dice.map_or_else(|| "-".to_string(), |d| d.to_string())
}
