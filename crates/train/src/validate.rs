//! Validation during training: sliding-window predictions of the validation cases and their
//! mean foreground DSC.

use anyhow::Result;
use candle_core::Device;
use cwseg_models::Network;

use crate::card::ModelCard;
use crate::predict::predict_probabilities;
use crate::prepare::PreparedCase;
use crate::regions::decide;

/// Per-class DSC of a prediction (NaN where the class is in neither).
pub fn dice_per_class(
    prediction: &ndarray::Array3<u8>,
    label: &ndarray::Array3<u8>,
    classes: usize,
) -> Vec<f64> {
    let mut inter = vec![0u64; classes];
    let mut p = vec![0u64; classes];
    let mut g = vec![0u64; classes];
    for (&a, &b) in prediction.iter().zip(label.iter()) {
        p[a as usize % classes] += 1;
        g[b as usize % classes] += 1;
        if a == b {
            inter[a as usize % classes] += 1;
        }
    }
    (0..classes)
        .map(|k| {
            if p[k] + g[k] == 0 {
                f64::NAN
            } else {
                2.0 * inter[k] as f64 / (p[k] + g[k]) as f64
            }
        })
        .collect()
}

/// Mean over foreground classes of the mean over cases, NaN-skipping.
pub fn mean_foreground(per_case: &[Vec<f64>]) -> (f64, Vec<f64>) {
    let classes = per_case.first().map_or(0, Vec::len);
    let per_class: Vec<f64> = (1..classes)
        .map(|k| {
            let v: Vec<f64> = per_case
                .iter()
                .map(|c| c[k])
                .filter(|d| d.is_finite())
                .collect();
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        })
        .collect();
    let valid: Vec<f64> = per_class
        .iter()
        .copied()
        .filter(|d| d.is_finite())
        .collect();
    let mean = if valid.is_empty() {
        f64::NAN
    } else {
        valid.iter().sum::<f64>() / valid.len() as f64
    };
    (mean, per_class)
}

/// The per-class DSC of one validation case's sliding-window prediction with `card`'s window
/// (Gaussian-weighted probabilities with `overlap` for cwseg's runs), labels by the argmax or
/// the card's regions.
pub fn case_dice(
    network: &Network,
    case: &PreparedCase,
    card: &ModelCard,
    overlap: f64,
    device: &Device,
) -> Result<Vec<f64>> {
    let probs = predict_probabilities(
        network,
        &case.image.data,
        card.outputs(),
        card.patch,
        card.sliding_window(overlap),
        2,
        device,
    )?;
    let regions = card.region_classes()?;
    Ok(dice_per_class(
        &decide(probs.view(), regions.as_ref()),
        &case.label.data,
        card.classes.len(),
    ))
}
