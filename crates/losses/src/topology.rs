//! Topology-aware losses: soft clDice (Shit et al. 2021) and its compound with the dice loss, as
//! MONAI 1.6's `SoftclDiceLoss` and `SoftDiceclDiceLoss`.
//!
//! The soft skeleton of a map `x` `(N, C, D, H, W)` with `n` iterations:
//! `erode(x)` = the minimum of the three 3-voxel minima along `D`, `H` and `W` (a cross),
//! `dilate(x)` = the 3×3×3 maximum, `open = dilate ∘ erode`, both ignoring voxels outside the
//! volume; `skel_0 = relu(x − open(x))`, then `n` times `x ← erode(x)`,
//! `δ = relu(x − open(x))`, `skel ← skel + relu(δ − skel · δ)`. A `D = 1` volume is 2D (the
//! depth axis is not filtered), as MONAI's `(N, C, H, W)` form.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{Prepared, Reductions, refuse_regions};
use crate::dice::Dice;
use crate::target::Target;
use crate::{Loss, LossError, Result};

/// Soft clDice loss, per sample over every kept channel and voxel together:
/// `T_prec = (Σ skel(p) t + s_nr) / (Σ skel(p) + s_dr)`,
/// `T_sens = (Σ skel(t) p + s_nr) / (Σ skel(t) + s_dr)`,
/// `clDice = 1 − 2 T_prec T_sens / (T_prec + T_sens + s)`, then the mean over samples;
/// `p = softmax(z)` over classes, `t = onehot(y)`, every channel kept (background included)
/// unless `include_background` is false; 3 skeleton iterations, `s_nr = s_dr = 1`,
/// `s = 1e-4`. Equals MONAI `SoftclDiceLoss(softmax=True, to_onehot_y=True)`, that is
/// `SoftclDiceLoss()(softmax(z), one_hot(y))`. Needs at least 2 classes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SoftClDice {
    /// Skeleton iterations (MONAI's `iter_`).
    pub iterations: usize,
    /// Numerator smoothing of `T_prec` and `T_sens`.
    pub smooth_nr: f64,
    /// Denominator smoothing of `T_prec` and `T_sens`.
    pub smooth_dr: f64,
    /// Smoothing `s` of the harmonic mean's denominator.
    pub smooth: f64,
    /// Count class 0.
    pub include_background: bool,
}

impl Default for SoftClDice {
    fn default() -> Self {
        SoftClDice {
            iterations: 3,
            smooth_nr: 1.0,
            smooth_dr: 1.0,
            smooth: 1e-4,
            include_background: true,
        }
    }
}

impl SoftClDice {
    /// The value from probabilities and one-hot targets `(N, K, D, H, W)`.
    pub(crate) fn value(&self, p: &Tensor, t: &Tensor) -> Result<Tensor> {
        let p = Prepared::foreground(p, self.include_background)?;
        let t = Prepared::foreground(t, self.include_background)?;
        let skel_p = soft_skeleton(&p, self.iterations)?;
        let skel_t = soft_skeleton(&t, self.iterations)?;
        let ratio = |skel: &Tensor, other: &Tensor| -> Result<Tensor> {
            let num = per_sample(&(skel * other)?)?.affine(1.0, self.smooth_nr)?;
            Ok((num / per_sample(skel)?.affine(1.0, self.smooth_dr)?)?)
        };
        let precision = ratio(&skel_p, &t)?;
        let sensitivity = ratio(&skel_t, &p)?;
        let harmonic = ((&precision * &sensitivity)?.affine(2.0, 0.0)?
            / (precision + sensitivity)?.affine(1.0, self.smooth)?)?;
        Ok(harmonic.affine(-1.0, 1.0)?.mean_all()?)
    }

    fn check(&self, loss: &'static str, classes: usize) -> Result<()> {
        if classes < 2 {
            return Err(LossError::Config {
                loss,
                what: "needs at least 2 classes (softmax over classes)".into(),
            });
        }
        if self.smooth <= 0.0 {
            return Err(LossError::Config {
                loss,
                what: format!("smooth = {}: must be positive", self.smooth),
            });
        }
        Ok(())
    }
}

impl Loss for SoftClDice {
    fn name(&self) -> &'static str {
        "cldice"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let prepared = Prepared::new(logits, target)?;
        self.check("cldice", prepared.classes)?;
        self.value(&prepared.probs()?, &prepared.onehot)
    }
}

/// `(1 − α) · DL + α · clDice`, α = 0.5, both parts with `s_nr = s_dr = 1` and every channel
/// (background included): DL is [`Dice`] (per sample and class, then the mean) and clDice is
/// [`SoftClDice`] with the same settings. Equals MONAI
/// `SoftDiceclDiceLoss(softmax=True, to_onehot_y=True)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SoftDiceClDice {
    /// Skeleton iterations of the clDice part.
    pub iterations: usize,
    /// Weight α of clDice, in `[0, 1]`.
    pub alpha: f64,
    /// Numerator smoothing of both parts.
    pub smooth_nr: f64,
    /// Denominator smoothing of both parts.
    pub smooth_dr: f64,
    /// Smoothing of clDice's harmonic mean.
    pub smooth: f64,
    /// Count class 0 in both parts.
    pub include_background: bool,
}

impl Default for SoftDiceClDice {
    fn default() -> Self {
        let cl = SoftClDice::default();
        SoftDiceClDice {
            iterations: cl.iterations,
            alpha: 0.5,
            smooth_nr: cl.smooth_nr,
            smooth_dr: cl.smooth_dr,
            smooth: cl.smooth,
            include_background: cl.include_background,
        }
    }
}

impl SoftDiceClDice {
    /// The two parts as separate losses.
    pub fn parts(&self) -> (Dice, SoftClDice) {
        let dice = Dice {
            include_background: self.include_background,
            smooth_nr: self.smooth_nr,
            smooth_dr: self.smooth_dr,
            ..Dice::default()
        };
        let cldice = SoftClDice {
            iterations: self.iterations,
            smooth_nr: self.smooth_nr,
            smooth_dr: self.smooth_dr,
            smooth: self.smooth,
            include_background: self.include_background,
        };
        (dice, cldice)
    }
}

impl Loss for SoftDiceClDice {
    fn name(&self) -> &'static str {
        "dice_cldice"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        refuse_regions(target, "dice_cldice")?;
        let (dice, cldice) = self.parts();
        let r = Reductions::new(logits, target)?;
        cldice.check("dice_cldice", r.classes)?;
        let prepared = Prepared::with_labels(logits, r.labels.clone())?;
        let cl = cldice.value(&prepared.probs()?, &prepared.onehot)?;
        let dl = dice.value(&r)?;
        Ok((dl.affine(1.0 - self.alpha, 0.0)? + cl.affine(self.alpha, 0.0)?)?)
    }
}

/// `(N,)` sums over every axis but the first.
fn per_sample(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.sum(1)?)
}

/// `relu` with PyTorch's gradient: 0 where `x = 0` (candle's passes it there).
fn relu(x: &Tensor) -> Result<Tensor> {
    let positive = x.gt(0.0)?.to_dtype(x.dtype())?;
    Ok((x * positive)?)
}

/// The soft skeleton of `x` `(N, C, D, H, W)` with `iterations` erosions (module docs).
pub(crate) fn soft_skeleton(x: &Tensor, iterations: usize) -> Result<Tensor> {
    let mut image = x.clone();
    let mut eroded = soft_erode(&image)?;
    let mut skeleton = relu(&(&image - soft_dilate(&eroded)?)?)?;
    for _ in 0..iterations {
        image = eroded;
        eroded = soft_erode(&image)?;
        let delta = relu(&(&image - soft_dilate(&eroded)?)?)?;
        let update = relu(&(&delta - (&skeleton * &delta)?)?)?;
        skeleton = (skeleton + update)?;
    }
    Ok(skeleton)
}

/// The minimum of the 3-voxel minima along depth, height and width.
fn soft_erode(x: &Tensor) -> Result<Tensor> {
    let depth = extreme3(x, 2, Extreme::Min)?;
    let height = extreme3(x, 3, Extreme::Min)?;
    let width = extreme3(x, 4, Extreme::Min)?;
    Ok(depth.minimum(&height)?.minimum(&width)?)
}

/// The 3×3×3 maximum (separable).
fn soft_dilate(x: &Tensor) -> Result<Tensor> {
    let mut out = x.clone();
    for axis in [4, 3, 2] {
        out = extreme3(&out, axis, Extreme::Max)?;
    }
    Ok(out)
}

#[derive(Clone, Copy)]
enum Extreme {
    Min,
    Max,
}

/// The extreme of `x[i − 1], x[i], x[i + 1]` along `axis`, voxels outside the volume ignored
/// (the edge value repeated). Ties split the gradient; as the tied values are one voxel's
/// value reached along several paths, every voxel gets PyTorch's gradient.
fn extreme3(x: &Tensor, axis: usize, which: Extreme) -> Result<Tensor> {
    let n = x.dim(axis)?;
    if n == 1 {
        return Ok(x.clone());
    }
    let padded = x.pad_with_same(axis, 1, 1)?;
    let (before, here, after) = (
        padded.narrow(axis, 0, n)?,
        padded.narrow(axis, 1, n)?,
        padded.narrow(axis, 2, n)?,
    );
    Ok(match which {
        Extreme::Min => before.minimum(&here)?.minimum(&after)?,
        Extreme::Max => before.maximum(&here)?.maximum(&after)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn skeleton_of_a_bar_is_its_centre_line() -> Result<()> {
        let mut values = vec![0f64; 7 * 7];
        for x in 1..6 {
            for y in 2..5 {
                values[y * 7 + x] = 1.0;
            }
        }
        let bar = Tensor::from_vec(values.clone(), (1, 1, 1, 7, 7), &Device::Cpu)?;
        let skeleton = soft_skeleton(&bar, 3)?;
        assert_eq!(skeleton.dtype(), DType::F64);
        let skel: Vec<f64> = skeleton.flatten_all()?.to_vec1()?;
        assert!(skel.iter().zip(&values).all(|(s, v)| *s <= *v));
        assert_eq!(skel[3 * 7 + 3], 1.0, "the bar's centre line");
        Ok(())
    }
}
