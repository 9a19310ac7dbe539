//! A training budget in minutes (`cwseg plan --minutes N`): a short calibration run of the
//! planned configuration on this machine measures the time of an optimizer step and of one
//! validation pass, and the epochs are chosen so that the run fits the budget.
//!
//! With `t_s` seconds per step, `t_v` per validation pass, `B` batches per epoch and
//! validation every `k` epochs, a run of `E` epochs takes about `E (B t_s + t_v / k) + t_v`
//! (the last epoch always validates, and post-processing is decided with one more pass). `k`
//! is the smallest that keeps validation under a tenth of the training time; `E` the most
//! epochs that fit.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::config::TrainConfig;
use crate::trainer::{EpochReport, RunOptions, StepReport, TrainHooks, train};

/// What the calibration run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Seconds per optimizer step (the median of the steps after each epoch's first).
    pub step_seconds: f64,
    /// Seconds of one validation pass over the validation cases.
    pub validation_seconds: f64,
}

/// Steps per calibration epoch.
const STEPS: usize = 4;

/// Times the steps and epochs of the calibration run.
#[derive(Default)]
struct Timer {
    last: Option<Instant>,
    steps: Vec<f64>,
    epochs: Vec<f64>,
}

impl TrainHooks for Timer {
    fn step(&mut self, report: &StepReport) {
        let now = Instant::now();
        if let Some(last) = self.last
            && report.batch > 1
        {
            self.steps.push((now - last).as_secs_f64());
        }
        self.last = Some(now);
    }

    fn epoch(&mut self, report: &EpochReport) {
        self.epochs.push(report.seconds);
        self.last = None;
    }
}

/// Trains `config` for two epochs of [`STEPS`] steps in a temporary folder (the second epoch
/// validates) and returns what it measured; nothing is kept.
pub fn calibrate(config: &TrainConfig) -> Result<Calibration> {
    let folder = tempfile::tempdir()?;
    let mut short = config.clone();
    short.epochs = 2;
    short.batches_per_epoch = STEPS;
    short.validation.every = 2;
    short.validation.postprocess = false;
    short.validation.patience = None;
    let mut timer = Timer::default();
    let options = RunOptions {
        resume: false,
        data_dir: Some(folder.path().join("data")),
        communicator: None,
    };
    train(&short, &folder.path().join("run"), &options, &mut timer)?;
    let mut steps = timer.steps;
    if steps.is_empty() || timer.epochs.len() != 2 {
        bail!("the calibration run did not time its steps");
    }
    steps.sort_by(f64::total_cmp);
    let step_seconds = steps[steps.len() / 2];
    let validation_seconds = (timer.epochs[1] - STEPS as f64 * step_seconds).max(0.0);
    Ok(Calibration {
        step_seconds,
        validation_seconds,
    })
}

/// Sets `config`'s epochs and validation interval so that training fits `minutes` by the
/// module's model; returns the reason written beside them. Keeps `batches_per_epoch`, unless
/// the budget holds less than one epoch of them.
pub fn fit_minutes(
    config: &mut TrainConfig,
    measured: Calibration,
    minutes: f64,
) -> Result<String> {
    if !(minutes.is_finite() && minutes > 0.0) {
        bail!("--minutes {minutes}: a positive number of minutes");
    }
    let (ts, tv) = (measured.step_seconds, measured.validation_seconds);
    let budget = minutes * 60.0 - tv;
    let batches = config.batches_per_epoch.max(1);
    let epoch = batches as f64 * ts;
    let every = ((tv / (0.1 * epoch.max(1e-9))).ceil() as usize).max(1);
    let epochs = (budget / (epoch + tv / every as f64)).floor();
    if epochs < 1.0 {
        let steps = (budget / ts).floor();
        if steps < 1.0 {
            bail!(
                "--minutes {minutes}: one step takes {ts:.1} s and one validation {tv:.0} s here; \
                 the budget holds no training"
            );
        }
        config.batches_per_epoch = steps as usize;
        config.epochs = 1;
    } else {
        config.epochs = epochs as usize;
    }
    config.validation.every = every.min(config.epochs);
    Ok(format!(
        "{minutes} min on this machine (--minutes): a calibration run measured {ts:.2} s per step \
         and {tv:.1} s per validation; {} epochs of {} steps, validating every {} epochs",
        config.epochs, config.batches_per_epoch, config.validation.every
    ))
}

/// [`calibrate`] then [`fit_minutes`], for a configuration whose data lie at its source.
pub fn plan_minutes(config: &mut TrainConfig, minutes: f64) -> Result<String> {
    let measured = calibrate(config)?;
    tracing::info!(?measured, "calibration run");
    fit_minutes(config, measured, minutes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epochs_fit_the_budget_and_validation_stays_under_a_tenth() {
        let mut config = TrainConfig {
            batches_per_epoch: 30,
            ..TrainConfig::default()
        };
        let measured = Calibration {
            step_seconds: 1.5,
            validation_seconds: 20.0,
        };
        fit_minutes(&mut config, measured, 60.0).expect("fits");
        let every = config.validation.every as f64;
        let seconds = config.epochs as f64 * (30.0 * 1.5 + 20.0 / every) + 20.0;
        assert!(seconds <= 3600.0, "{seconds}");
        // one more epoch would not fit
        assert!(seconds + 30.0 * 1.5 + 20.0 / every > 3600.0 - 1e-9);
        assert!(20.0 / every <= 0.1 * 30.0 * 1.5 * 1.0001);
        // a budget under one epoch shortens the epoch
        fit_minutes(&mut config, measured, 0.5).expect("fits");
        assert_eq!((config.epochs, config.batches_per_epoch), (1, 6));
        assert!(fit_minutes(&mut config, measured, 0.2).is_err());
    }
}
