//! Compound losses (formulas §4) and the boundary loss.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{Prepared, Reductions, mean};
use crate::cross_entropy::{ContourWeightedCrossEntropy, CrossEntropy, Focal, Preset};
use crate::dice::{Dice, SeparableDice};
use crate::target::{ContourConfig, Target};
use crate::{Loss, LossError, Result};

/// `CEDL = λ_ce · CE + λ_dice · DL`, λ = 1 (MONAI `DiceCELoss(softmax=True, to_onehot_y=True,
/// include_background=False)`: the dice part without background, CE over every class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossEntropyDice {
    /// Weight of CE.
    pub lambda_ce: f64,
    /// Weight of DL.
    pub lambda_dice: f64,
    /// The CE part.
    pub ce: CrossEntropy,
    /// The dice part.
    pub dice: Dice,
}

impl Default for CrossEntropyDice {
    fn default() -> Self {
        CrossEntropyDice {
            lambda_ce: 1.0,
            lambda_dice: 1.0,
            ce: CrossEntropy::default(),
            dice: Dice::default(),
        }
    }
}

impl Loss for CrossEntropyDice {
    fn name(&self) -> &'static str {
        "cedl"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let r = Reductions::new(logits, target)?;
        let (weights, total) = self.ce.voxel_weights(&r)?;
        r.plan(None, Some(&weights))?;
        let ce = self
            .ce
            .value_with(&r, &weights, total)?
            .affine(self.lambda_ce, 0.0)?;
        Ok((ce + self.dice.value(&r)?.affine(self.lambda_dice, 0.0)?)?)
    }
}

/// The paper's compound loss (eq. 11): `CWCD = CWCE + SDL`, sharing one contour map.
/// Preset `reference` = reference CWCE + reference SDL (about 2× the paper form; Adam does
/// not see the scale).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContourWeightedDice {
    /// Weight λ of contour voxels in CWCE.
    pub lambda: f64,
    /// Weight α of the contour part of SDL.
    pub alpha: f64,
    /// The contour settings of both parts.
    pub contour: ContourConfig,
    /// `paper` or `reference`.
    pub preset: Preset,
}

impl Default for ContourWeightedDice {
    fn default() -> Self {
        ContourWeightedDice {
            lambda: 1.0,
            alpha: 0.5,
            contour: ContourConfig::default(),
            preset: Preset::Paper,
        }
    }
}

impl ContourWeightedDice {
    /// The two parts as separate losses.
    pub fn parts(&self) -> (ContourWeightedCrossEntropy, SeparableDice) {
        let cwce = ContourWeightedCrossEntropy {
            lambda: self.lambda,
            contour: self.contour,
            preset: self.preset,
            ..ContourWeightedCrossEntropy::default()
        };
        let sdl = SeparableDice {
            alpha: self.alpha,
            contour: self.contour,
            preset: self.preset,
            ..SeparableDice::default()
        };
        (cwce, sdl)
    }
}

impl Loss for ContourWeightedDice {
    fn name(&self) -> &'static str {
        "cwcd"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        self.contour.validate("cwcd")?;
        let r = Reductions::new(logits, target)?;
        let (cwce, sdl) = self.parts();
        // One edge map for both parts.
        let edges = r.edges(&self.contour)?;
        let weights = cwce.voxel_weights(&r, &edges)?;
        r.plan(Some(&edges), Some(&weights))?;
        Ok((cwce.value_with(&r, &weights)? + sdl.value(&r, &edges)?)?)
    }
}

/// `DiceFocal = λ_dice · DL + λ_focal · Focal` (DL without background, Focal over every
/// class in the form of docs/formulas.md §4). MONAI's `DiceFocalLoss` equals DL + Focal / K with
/// `include_background=True` for its focal part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiceFocal {
    /// Weight of DL.
    pub lambda_dice: f64,
    /// Weight of Focal.
    pub lambda_focal: f64,
    /// The dice part.
    pub dice: Dice,
    /// The focal part.
    pub focal: Focal,
}

impl Default for DiceFocal {
    fn default() -> Self {
        DiceFocal {
            lambda_dice: 1.0,
            lambda_focal: 1.0,
            dice: Dice::default(),
            focal: Focal::default(),
        }
    }
}

impl Loss for DiceFocal {
    fn name(&self) -> &'static str {
        "dicefocal"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        crate::common::refuse_regions(target, "dicefocal")?;
        // Labels are checked once, for both parts.
        let r = Reductions::new(logits, target)?;
        let dice = self.dice.value(&r)?.affine(self.lambda_dice, 0.0)?;
        let focal = self
            .focal
            .value(&Prepared::with_labels(logits, r.labels.clone())?)?;
        Ok((dice + focal.affine(self.lambda_focal, 0.0)?)?)
    }
}

/// Boundary loss (Kervadec 2019): `(1/|V|) Σ_{k≥1} Σ_v p_{k,v} φ_k(v)`, `φ_k` the signed
/// distance to class k's boundary in voxels (negative inside, 0 for an absent class;
/// `cwseg_morphology::signed_distance`, computed on the CPU unless the target carries it).
/// Negative values are expected: it is minimal when every class is predicted inside itself.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Boundary {}

impl Loss for Boundary {
    fn name(&self) -> &'static str {
        "boundary"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let p = Prepared::new(logits, target)?;
        if p.classes < 2 {
            return Err(LossError::Config {
                loss: "boundary",
                what: "needs at least 2 classes".into(),
            });
        }
        let phi = target.signed_distance(&p.labels, p.classes, &p.logp)?;
        let probs = Prepared::foreground(&p.probs()?, false)?;
        let phi = Prepared::foreground(&phi, false)?;
        let per_voxel = (probs * phi)?.sum(1)?;
        mean(&per_voxel)
    }
}
