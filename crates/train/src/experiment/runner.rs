//! One run of the grid: trained (or resumed), then its test cases predicted, with its
//! `status.json` kept up to date.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cwseg_data::{LabelMap, write_label};

use super::status::{RunStatus, train_seconds, write_status, write_status_creating};
use super::{ExperimentConfig, RunKey};
use crate::card::load_model;
use crate::compare::Predictions;
use crate::config::TrainConfig;
use crate::device::parse_device;
use crate::predict::{PredictOptions, predict_case};
use crate::prepare::open_data;
use crate::trainer::{RunState, TrainHooks, train_to_end};

/// Trains (or resumes) one run, then predicts its test cases into `RUN/predictions/`.
pub(super) fn run_one(
    config: &ExperimentConfig,
    run: &RunKey,
    dir: &Path,
    data_dir: &Path,
    hooks: &mut dyn TrainHooks,
) -> Result<()> {
    let train_config = config.run_config(run)?;
    let mut status = RunStatus {
        state: "training".into(),
        cwseg_version: env!("CARGO_PKG_VERSION").into(),
        ..RunStatus::default()
    };
    write_status_creating(dir, &status)?;
    train_to_end(&train_config, dir, data_dir, hooks, &run.key())?;
    status.state = "predicting".into();
    status.train_seconds = train_seconds(dir);
    write_status(dir, &status)?;

    let start = Instant::now();
    let best = predict_test_cases(&train_config, run, dir, data_dir)?;
    let state: RunState = serde_json::from_str(
        &fs::read_to_string(dir.join("last").join("state.json")).context("reading state.json")?,
    )?;
    status.best_val_dice = state.best_dice;
    status.best_epoch = state.best_epoch;
    status.predict_seconds = start.elapsed().as_secs_f64();
    status.state = "done".into();
    write_status(dir, &status)?;
    tracing::info!(run = run.key(), checkpoint = %best.display(), "predicted the test cases");
    Ok(())
}

/// Predicts the test cases of the split the run recorded, with its best checkpoint, into
/// `RUN/predictions/` (post-processed) and the unprocessed predictions' folder; returns the
/// checkpoint.
fn predict_test_cases(
    train_config: &TrainConfig,
    run: &RunKey,
    dir: &Path,
    data_dir: &Path,
) -> Result<PathBuf> {
    let device = parse_device(&train_config.device)?;
    // the test cases of the split the run recorded when it started
    let data = open_data(&train_config.data, train_config.seed, data_dir)?
        .with_recorded_split(&dir.join("split.json"))?;
    if data.split.test.is_empty() {
        bail!("{}: the split has no test cases to evaluate", run.key());
    }
    let (network, card, best) = load_model(dir, &device)?;
    for variant in [Predictions::Postprocessed, Predictions::Unprocessed] {
        let folder = dir.join(variant.folder());
        fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    }
    for id in &data.split.test {
        let (image, _) = data.load_input(id)?;
        let options = PredictOptions {
            overlap: card.overlap,
            postprocess: true,
            mirror: false,
            keep_probabilities: false,
        };
        let prediction = predict_case(&network, &card, &image, options, &device)?;
        let unprocessed = prediction
            .unprocessed
            .unwrap_or_else(|| prediction.labels.clone());
        for (variant, data) in [
            (Predictions::Postprocessed, prediction.labels),
            (Predictions::Unprocessed, unprocessed),
        ] {
            write_label(
                dir.join(variant.folder()).join(format!("{id}.nii.gz")),
                &LabelMap {
                    data,
                    geometry: image.geometry.clone(),
                },
            )?;
        }
    }
    Ok(best)
}
