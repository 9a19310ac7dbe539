//! Losses from configuration: `{"name": "cwcd", "lambda": 1.0, "preset": "paper"}`.

use cwseg_morphology::DwceSpec;
use serde::{Deserialize, Serialize};

use crate::compound::{Boundary, ContourWeightedDice, CrossEntropyDice, DiceFocal};
use crate::cross_entropy::{
    ContourWeightedCrossEntropy, CrossEntropy, DistanceWeightedCrossEntropy, Focal,
};
use crate::dice::{Dice, GeneralizedDice, SeparableDice, Tversky};
use crate::distance::{HausdorffDt, LogHausdorffDt};
use crate::skeleton_recall::{DiceCeSkeletonRecall, SkeletonRecall};
use crate::target::ContourConfig;
use crate::topology::{SoftClDice, SoftDiceClDice};
use crate::unified_focal::UnifiedFocal;
use crate::{Loss, LossError, Result};

/// Every loss's configuration, tagged by its lower-case short name; omitted fields take
/// the defaults of docs/formulas.md, unknown fields are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum LossConfig {
    /// Cross-entropy.
    Ce(CrossEntropy),
    /// Dice loss.
    Dl(Dice),
    /// Generalised dice loss.
    Gdl(GeneralizedDice),
    /// Distance-weighted cross-entropy.
    Dwce(DistanceWeightedCrossEntropy),
    /// CE + DL.
    Cedl(CrossEntropyDice),
    /// Contour-weighted cross-entropy.
    Cwce(ContourWeightedCrossEntropy),
    /// Separable dice loss.
    Sdl(SeparableDice),
    /// CWCE + SDL.
    Cwcd(ContourWeightedDice),
    /// Focal loss.
    Focal(Focal),
    /// Tversky loss.
    Tversky(Tversky),
    /// DL + Focal.
    Dicefocal(DiceFocal),
    /// Boundary loss.
    Boundary(Boundary),
    /// Soft clDice.
    Cldice(SoftClDice),
    /// Dice + soft clDice.
    #[serde(rename = "dice_cldice")]
    DiceCldice(SoftDiceClDice),
    /// Hausdorff-distance loss by distance transforms.
    #[serde(rename = "hausdorff_dt")]
    HausdorffDt(HausdorffDt),
    /// `log(1 + HD)`.
    #[serde(rename = "log_hausdorff_dt")]
    LogHausdorffDt(LogHausdorffDt),
    /// Asymmetric unified focal loss (binary only).
    #[serde(rename = "unified_focal")]
    UnifiedFocal(UnifiedFocal),
    /// Skeleton Recall (the SR term alone).
    #[serde(rename = "skeleton_recall")]
    SkeletonRecall(SkeletonRecall),
    /// CEDL + Skeleton Recall.
    #[serde(rename = "dice_ce_skeleton_recall")]
    DiceCeSkeletonRecall(DiceCeSkeletonRecall),
}

/// Most skeleton iterations clDice and Dice + clDice take.
pub const MAX_SKELETON_ITERATIONS: usize = 1000;

/// Largest exponent α of the Hausdorff-DT losses: `(10⁴)^8 = 10³²` is within f32.
pub const MAX_HAUSDORFF_ALPHA: f64 = 8.0;

impl LossConfig {
    /// The configuration of the loss called `name`, with its defaults.
    pub fn from_name(name: &str) -> Result<Self> {
        serde_json::from_value(serde_json::json!({ "name": name }))
            .map_err(|_| LossError::UnknownLoss(name.to_string()))
    }

    /// Parses a JSON configuration and checks its numbers ([`LossConfig::validate`]).
    pub fn from_json(text: &str) -> Result<Self> {
        let text = text.trim_start_matches('\u{feff}');
        let config: LossConfig = serde_json::from_str(text).map_err(|e| LossError::Config {
            loss: "config",
            what: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every number of the configuration: finite and non-negative (weights, λ, α,
    /// smoothing terms, w0, σ, γ, class weights), SDL's / CWCD's / dice_cldice's α at
    /// most 1, and unified_focal's weight, γ and δ at most 1. The error names the field (`lambda`, `dice.smooth_nr`, …).
    pub fn validate(&self) -> Result<()> {
        let value = serde_json::to_value(self).map_err(|e| LossError::Config {
            loss: "config",
            what: e.to_string(),
        })?;
        let mut bad = Vec::new();
        check_numbers(&value, "", &mut bad);
        if matches!(
            self,
            LossConfig::Sdl(_) | LossConfig::Cwcd(_) | LossConfig::DiceCldice(_)
        ) && value["alpha"].as_f64().is_some_and(|a| a > 1.0)
        {
            bad.push(format!("alpha = {}: at most 1", value["alpha"]));
        }
        if let LossConfig::UnifiedFocal(l) = self {
            bad.extend(l.out_of_range());
        }
        bad.extend(self.topology_out_of_range());
        if matches!(self, LossConfig::Tversky(_))
            && value["alpha"].as_f64().unwrap_or(0.0) + value["beta"].as_f64().unwrap_or(0.0) <= 0.0
        {
            bad.push(format!(
                "alpha = {}, beta = {} (α + β > 0, or every Tversky index is 1)",
                value["alpha"], value["beta"]
            ));
        }
        for weights in find_key(&value, "class_weights") {
            let all_zero = weights
                .as_array()
                .is_some_and(|w| !w.is_empty() && w.iter().all(|v| v.as_f64() == Some(0.0)));
            if all_zero {
                bad.push("class_weights all 0 (the loss would be 0 for any prediction)".into());
            }
        }
        if let Some(contour) = self.contour() {
            contour.validate(self.build().name())?;
        }
        match bad.first() {
            None => Ok(()),
            Some(first) => Err(LossError::Config {
                loss: self.build().name(),
                what: first.clone(),
            }),
        }
    }

    /// clDice's skeleton iterations (at most [`MAX_SKELETON_ITERATIONS`]: a training step
    /// that never ends cannot be interrupted) and harmonic-mean smoothing (positive), and the
    /// Hausdorff-DT losses' α (at most [`MAX_HAUSDORFF_ALPHA`], so that `d^α` stays finite in
    /// f32 for distances up to 10⁴ voxels).
    fn topology_out_of_range(&self) -> Vec<String> {
        let (iterations, smooth, alpha) = match self {
            LossConfig::Cldice(l) => (Some(l.iterations), Some(l.smooth), None),
            LossConfig::DiceCldice(l) => (Some(l.iterations), Some(l.smooth), None),
            LossConfig::HausdorffDt(l) => (None, None, Some(l.alpha)),
            LossConfig::LogHausdorffDt(l) => (None, None, Some(l.alpha)),
            _ => (None, None, None),
        };
        let mut bad = Vec::new();
        if let Some(n) = iterations.filter(|&n| n > MAX_SKELETON_ITERATIONS) {
            bad.push(format!(
                "iterations = {n}: at most {MAX_SKELETON_ITERATIONS} (more than half the \
                 largest side changes nothing)"
            ));
        }
        if let Some(s) = smooth.filter(|&s| s <= 0.0) {
            bad.push(format!("smooth = {s}: must be positive"));
        }
        if let Some(a) = alpha.filter(|&a| a > MAX_HAUSDORFF_ALPHA) {
            bad.push(format!(
                "alpha = {a:e}: at most {MAX_HAUSDORFF_ALPHA} (d^alpha overflows f32)"
            ));
        }
        bad
    }

    /// The contour settings of a loss that weights or splits voxels by contours (CWCE, SDL,
    /// CWCD): what a data pipeline needs to make the contour maps itself
    /// ([`crate::Target::with_edges`]).
    pub fn contour(&self) -> Option<ContourConfig> {
        match self {
            LossConfig::Cwce(l) => Some(l.contour),
            LossConfig::Sdl(l) => Some(l.contour),
            LossConfig::Cwcd(l) => Some(l.contour),
            _ => None,
        }
    }

    /// The DWCE weight map's settings, for DWCE: what a data pipeline needs to make the
    /// weights on whole volumes ([`crate::Target::with_dwce_weights`]).
    pub fn dwce(&self) -> Option<DwceSpec> {
        match self {
            LossConfig::Dwce(l) => Some(l.spec()),
            _ => None,
        }
    }

    /// Whether the loss trains on Skeleton Recall's tubed skeleton: what a data pipeline needs
    /// to make the map itself ([`crate::Target::with_skeleton`]).
    pub fn uses_skeleton(&self) -> bool {
        matches!(
            self,
            LossConfig::SkeletonRecall(_) | LossConfig::DiceCeSkeletonRecall(_)
        )
    }

    /// Whether the loss has a region form ([`crate::regions`]): every loss made of the dice
    /// sums and the weighted cross-entropy (CE without class weights, DL, GDL, DWCE, CEDL, CWCE,
    /// SDL, CWCD, Tversky); not Focal, DiceFocal, the boundary loss, clDice, Dice + clDice, the
    /// Hausdorff losses, the unified focal loss or the Skeleton Recall losses (as the reference
    /// trainer, which refuses regions).
    pub fn has_region_form(&self) -> bool {
        match self {
            LossConfig::Ce(l) => l.class_weights.is_none(),
            LossConfig::Cedl(l) => l.ce.class_weights.is_none(),
            LossConfig::Focal(_)
            | LossConfig::Dicefocal(_)
            | LossConfig::Boundary(_)
            | LossConfig::Cldice(_)
            | LossConfig::DiceCldice(_)
            | LossConfig::HausdorffDt(_)
            | LossConfig::LogHausdorffDt(_)
            | LossConfig::UnifiedFocal(_)
            | LossConfig::SkeletonRecall(_)
            | LossConfig::DiceCeSkeletonRecall(_) => false,
            _ => true,
        }
    }

    /// The loss.
    pub fn build(&self) -> Box<dyn Loss> {
        match self.clone() {
            LossConfig::Ce(l) => Box::new(l),
            LossConfig::Dl(l) => Box::new(l),
            LossConfig::Gdl(l) => Box::new(l),
            LossConfig::Dwce(l) => Box::new(l),
            LossConfig::Cedl(l) => Box::new(l),
            LossConfig::Cwce(l) => Box::new(l),
            LossConfig::Sdl(l) => Box::new(l),
            LossConfig::Cwcd(l) => Box::new(l),
            LossConfig::Focal(l) => Box::new(l),
            LossConfig::Tversky(l) => Box::new(l),
            LossConfig::Dicefocal(l) => Box::new(l),
            LossConfig::Boundary(l) => Box::new(l),
            LossConfig::Cldice(l) => Box::new(l),
            LossConfig::DiceCldice(l) => Box::new(l),
            LossConfig::HausdorffDt(l) => Box::new(l),
            LossConfig::LogHausdorffDt(l) => Box::new(l),
            LossConfig::UnifiedFocal(l) => Box::new(l),
            LossConfig::SkeletonRecall(l) => Box::new(l),
            LossConfig::DiceCeSkeletonRecall(l) => Box::new(l),
        }
    }
}

/// Every loss name, in the order of docs/formulas.md.
pub const LOSS_NAMES: [&str; 19] = [
    "ce",
    "dl",
    "gdl",
    "dwce",
    "cedl",
    "cwce",
    "sdl",
    "cwcd",
    "focal",
    "tversky",
    "dicefocal",
    "boundary",
    "cldice",
    "dice_cldice",
    "hausdorff_dt",
    "log_hausdorff_dt",
    "unified_focal",
    "skeleton_recall",
    "dice_ce_skeleton_recall",
];

/// Collects `path = value` for every number of `value` that is negative or not finite (NaN and
/// infinities serialise as `null`, which a numeric field never is otherwise).
/// Every value under the key `key`, at any depth of `value`.
fn find_key<'a>(value: &'a serde_json::Value, key: &str) -> Vec<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .flat_map(|(k, v)| {
                let mut found = find_key(v, key);
                if k == key {
                    found.push(v);
                }
                found
            })
            .collect(),
        serde_json::Value::Array(items) => items.iter().flat_map(|v| find_key(v, key)).collect(),
        _ => Vec::new(),
    }
}

fn check_numbers(value: &serde_json::Value, path: &str, bad: &mut Vec<String>) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        serde_json::Value::Number(n) if n.as_f64().is_none_or(|v| !v.is_finite() || v < 0.0) => {
            bad.push(format!(
                "{path} = {n}: every number must be finite and non-negative"
            ));
        }
        serde_json::Value::Null if !path.is_empty() && !OPTIONAL_FIELDS.contains(&path) => {
            bad.push(format!(
                "{path} is not a finite number: every number must be finite and non-negative"
            ));
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_numbers(item, &join(&i.to_string()), bad);
            }
        }
        serde_json::Value::Object(fields) => {
            for (key, item) in fields {
                check_numbers(item, &join(key), bad);
            }
        }
        _ => {}
    }
}

/// Fields that are `null` when left out (not a non-finite number).
const OPTIONAL_FIELDS: [&str; 4] = [
    "class_weights",
    "ignore_index",
    "ce.class_weights",
    "ce.ignore_index",
];
