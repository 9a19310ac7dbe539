//! Losses from configuration: `{"name": "cwcd", "lambda": 1.0, "preset": "paper"}`.

use cwseg_morphology::DwceSpec;
use serde::{Deserialize, Serialize};

use crate::compound::{Boundary, ContourWeightedDice, CrossEntropyDice, DiceFocal};
use crate::cross_entropy::{
    ContourWeightedCrossEntropy, CrossEntropy, DistanceWeightedCrossEntropy, Focal,
};
use crate::dice::{Dice, GeneralizedDice, SeparableDice, Tversky};
use crate::target::ContourConfig;
use crate::{Loss, LossError, Result};

/// Every loss's configuration, tagged by its lower-case short name; omitted fields take the
/// SPEC defaults, unknown fields are errors.
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
}

impl LossConfig {
    /// The configuration of the loss called `name`, with its defaults.
    pub fn from_name(name: &str) -> Result<Self> {
        serde_json::from_value(serde_json::json!({ "name": name }))
            .map_err(|_| LossError::UnknownLoss(name.to_string()))
    }

    /// Parses a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| LossError::Config {
            loss: "config",
            what: e.to_string(),
        })
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
        }
    }
}

/// Every loss name, in SPEC order.
pub const LOSS_NAMES: [&str; 12] = [
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
];
