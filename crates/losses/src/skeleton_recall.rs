//! Skeleton Recall (Kirchhoff et al., ECCV 2024): the soft recall of the predicted
//! probabilities on a tubed skeleton of the labels, for thin tubular structures.
//!
//! The target is the tubed skeleton `s` (`cwseg_morphology::tubed_skeleton`): the skeleton of
//! the union of the foreground classes (3-D thinning, as `skimage.morphology.skeletonize`),
//! dilated twice by the face cross and multiplied by the labels, so `s(v)` is the class of
//! voxel `v` on the tube and 0 elsewhere. A data pipeline may give it with
//! [`Target::with_skeleton`]; otherwise it is made from the labels on the CPU
//! ([`skeleton_cpu`](crate::skeleton_cpu)). A `D = 1` volume is thinned as a one-slice 3-D
//! volume (the four in-plane directions: scikit-image's Lee thinning of that array), not by
//! Zhang's 2-D method that the reference's 2-D configurations use.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{Prepared, refuse_regions};
use crate::compound::CrossEntropyDice;
use crate::cross_entropy::CrossEntropy;
use crate::dice::Dice;
use crate::target::{Target, one_hot};
use crate::{Loss, LossError, Result};

/// The reference's floor of the recall's denominator (`torch.clip(·, 1e-8)`).
const DENOMINATOR_FLOOR: f64 = 1e-8;

/// Skeleton Recall loss, per sample `n` and foreground class `k ≥ 1`:
/// `R_{n,k} = (Σ_v p_{n,k,v} s_{n,k,v} + ε) / max(Σ_v s_{n,k,v} + ε, 10⁻⁸)`,
/// `SR = 1 − mean_{n,k} R_{n,k}`, with `p = softmax(z)` over classes, `s_k = [s = k]` the one-hot
/// tubed skeleton (module docs) and `ε = 10⁻⁵`; with `batch`, the sums run over the batch too
/// (one `R_k` per class, nnU-Net's `batch_dice`). A class absent from the skeleton has
/// `R = ε / ε = 1` and no gradient.
///
/// Equals `1 +` the reference's `SoftSkeletonRecallLoss(apply_nonlin=softmax, do_bg=False,
/// smooth=1e-5, batch_dice=batch)` (which returns `−mean R`): the same gradient, shifted by 1 so
/// that the loss is 0 at perfect recall, as this crate's dice losses. The reference's
/// `loss_mask` (for an ignore label) is left out. Refuses region targets and fewer than 2
/// classes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SkeletonRecall {
    /// Smoothing `ε` of the numerator and the denominator.
    pub smooth: f64,
    /// One recall per class over the whole batch instead of per sample.
    pub batch: bool,
}

impl Default for SkeletonRecall {
    fn default() -> Self {
        SkeletonRecall {
            smooth: 1e-5,
            batch: false,
        }
    }
}

impl SkeletonRecall {
    /// `SR` from probabilities `p` and the one-hot tubed skeleton `s`, both `(N, K, D, H, W)`.
    pub(crate) fn value(&self, p: &Tensor, s: &Tensor) -> Result<Tensor> {
        let p = Prepared::foreground(p, false)?;
        let s = Prepared::foreground(s, false)?;
        let sums = |x: &Tensor| -> Result<Tensor> {
            let per_sample = x.flatten_from(2)?.sum(2)?;
            Ok(if self.batch {
                per_sample.sum_keepdim(0)?
            } else {
                per_sample
            })
        };
        let hits = sums(&(&p * &s)?)?.affine(1.0, self.smooth)?;
        let size = sums(&s)?
            .affine(1.0, self.smooth)?
            .maximum(DENOMINATOR_FLOOR)?;
        Ok((hits / size)?.mean_all()?.affine(-1.0, 1.0)?)
    }

    /// The softmax probabilities and the one-hot tubed skeleton of `target`.
    fn inputs(loss: &'static str, logits: &Tensor, target: &Target) -> Result<(Tensor, Tensor)> {
        refuse_regions(target, loss)?;
        let labels = target.checked_labels(logits)?;
        let classes = logits.dim(1)?;
        if classes < 2 {
            return Err(LossError::Config {
                loss,
                what: "needs at least 2 classes (the recall is over foreground classes)".into(),
            });
        }
        let skeleton = target.skeleton(&labels, classes)?;
        let p = crate::composite::log_softmax(logits)?.exp()?;
        Ok((p, one_hot(&skeleton, classes, logits.dtype())?))
    }
}

impl Loss for SkeletonRecall {
    fn name(&self) -> &'static str {
        "skeleton_recall"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let (p, s) = SkeletonRecall::inputs("skeleton_recall", logits, target)?;
        self.value(&p, &s)
    }
}

/// `CEDL + λ_skeleton · SR`, `λ_skeleton = 1` (the reference trainer's `weight_srec`): this
/// crate's CEDL ([`CrossEntropyDice`]: CE + DL without background, MONAI's `DiceCELoss`) plus
/// [`SkeletonRecall`]. The reference adds SR to nnU-Net's `DC_and_CE_loss`
/// (`CE − soft dice`, batch dice by plan), whose value differs from CEDL by a constant 1 and
/// whose dice may pool the batch; set `dice.batch` and `skeleton.batch` to follow a plan's
/// `batch_dice`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiceCeSkeletonRecall {
    /// Weight of CE.
    pub lambda_ce: f64,
    /// Weight of DL.
    pub lambda_dice: f64,
    /// Weight of SR.
    pub lambda_skeleton: f64,
    /// The CE part.
    pub ce: CrossEntropy,
    /// The dice part.
    pub dice: Dice,
    /// The Skeleton Recall part.
    pub skeleton: SkeletonRecall,
}

impl Default for DiceCeSkeletonRecall {
    fn default() -> Self {
        let cedl = CrossEntropyDice::default();
        DiceCeSkeletonRecall {
            lambda_ce: cedl.lambda_ce,
            lambda_dice: cedl.lambda_dice,
            lambda_skeleton: 1.0,
            ce: cedl.ce,
            dice: cedl.dice,
            skeleton: SkeletonRecall::default(),
        }
    }
}

impl DiceCeSkeletonRecall {
    /// The CEDL part as its own loss.
    pub fn cedl(&self) -> CrossEntropyDice {
        CrossEntropyDice {
            lambda_ce: self.lambda_ce,
            lambda_dice: self.lambda_dice,
            ce: self.ce.clone(),
            dice: self.dice,
        }
    }
}

impl Loss for DiceCeSkeletonRecall {
    fn name(&self) -> &'static str {
        "dice_ce_skeleton_recall"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let (p, s) = SkeletonRecall::inputs("dice_ce_skeleton_recall", logits, target)?;
        let sr = self.skeleton.value(&p, &s)?;
        let cedl = self.cedl().forward(logits, target)?;
        Ok((cedl + sr.affine(self.lambda_skeleton, 0.0)?)?)
    }
}
