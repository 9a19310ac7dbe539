//! The end of a run: nnU-Net's post-processing decided on the validation cases with the best
//! checkpoint and recorded in `best/config.json`.

use std::path::Path;

use anyhow::Result;
use candle_core::Device;

use crate::card::load_model;
use crate::config::TrainConfig;
use crate::postprocess;
use crate::predict::predict_probabilities;
use crate::prepare::PreparedCase;
use crate::regions::decide;

/// Decides the post-processing on the validation cases with the best checkpoint and records
/// it in `best/config.json`; nothing to do without validation cases, when the configuration
/// says not to, or when the card has it already.
pub(super) fn decide_postprocessing(
    dir: &Path,
    val_cases: &[PreparedCase],
    config: &TrainConfig,
    device: &Device,
) -> Result<()> {
    if val_cases.is_empty() || !config.validation.postprocess {
        return Ok(());
    }
    let (network, mut card, best) = load_model(dir, device)?;
    if card.postprocessing.is_some() {
        return Ok(());
    }
    let regions = card.region_classes()?;
    let mut predictions = Vec::with_capacity(val_cases.len());
    for case in val_cases {
        let probs = predict_probabilities(
            &network,
            &case.image.data,
            card.outputs(),
            card.patch,
            card.sliding_window(config.validation.overlap),
            2,
            device,
        )?;
        predictions.push(decide(probs.view(), regions.as_ref()));
    }
    let labels: Vec<_> = val_cases.iter().map(|c| c.label.data.clone()).collect();
    let decided = postprocess::decide(&predictions, &labels, &card.classes, &card.label_values);
    tracing::info!(
        keep_largest = ?decided.keep_largest.iter().map(|g| &g.name).collect::<Vec<_>>(),
        before = decided.validation_dice_before,
        after = decided.validation_dice_after,
        "post-processing decided on the validation cases"
    );
    card.postprocessing = Some(decided);
    cwseg_data::dataset::write_atomic(
        &best.join("config.json"),
        serde_json::to_string_pretty(&card)?.as_bytes(),
    )?;
    Ok(())
}
