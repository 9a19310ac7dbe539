//! One run of the grid: trained (or resumed), then its test cases predicted, with its
//! `status.json` kept up to date; and the loading of a test case's image and labels.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cwseg_data::{LabelMap, ReadOptions, write_label};

use super::status::{RunStatus, train_seconds, write_status, write_status_creating};
use super::{ExperimentConfig, RunKey};
use crate::card::load_model;
use crate::compare::Predictions;
use crate::config::TrainConfig;
use crate::device::parse_device;
use crate::predict::{PredictOptions, predict_case};
use crate::prepare::{PreparedData, open_data};
use crate::trainer::{Interrupted, RunOptions, RunState, TrainHooks, train};

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
    train_run(&train_config, run, dir, data_dir, hooks)?;
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

/// Trains the run in `dir` to its end, resuming from `last/` where a checkpoint is there; a
/// run a hook stopped is an [`Interrupted`] error.
fn train_run(
    train_config: &TrainConfig,
    run: &RunKey,
    dir: &Path,
    data_dir: &Path,
    hooks: &mut dyn TrainHooks,
) -> Result<()> {
    crate::checkpoint::recover(&dir.join("last"))?;
    let resume = dir.join("last").join("state.json").exists();
    let outcome = train(
        train_config,
        dir,
        &RunOptions {
            resume,
            data_dir: Some(data_dir.to_path_buf()),
            communicator: None,
        },
        hooks,
    )?;
    if outcome.interrupted {
        return Err(Interrupted(format!(
            "interrupted during {}; run the same command again to continue",
            run.key()
        ))
        .into());
    }
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
        let (image, _) = load_input(&data, id)?;
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

/// A test case's image and labels on their own grid, unprocessed.
pub(super) fn load_input(
    data: &PreparedData,
    id: &str,
) -> Result<(cwseg_data::Image, Option<cwseg_data::LabelMap>)> {
    let case = data
        .dataset
        .case(id)
        .with_context(|| format!("case {id} is not in the data set"))?;
    Ok(data.dataset.load_case(case, &ReadOptions::default())?)
}
