//! The asymmetric unified focal loss (Yeung et al. 2022), as MONAI 1.6's
//! `AsymmetricUnifiedFocalLoss`: binary segmentation only.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{Prepared, refuse_regions};
use crate::target::Target;
use crate::{Loss, LossError, Result};

/// MONAI's `epsilon` of both parts (not a setting of its unified loss): the clamp of the
/// probabilities and the smoothing of the Tversky index.
const EPSILON: f64 = 1e-7;

/// Asymmetric unified focal loss, two classes (background 0, foreground 1):
/// `L = w · AF + (1 − w) · AFT`, with `p = clamp(softmax(z), ε, 1 − ε)`, `t = onehot(y)`,
/// `ε = 10⁻⁷`, and
/// - the asymmetric focal part, a mean over the `2 N |V|` terms of both channels:
///   `AF = (1/(2 N |V|)) Σ_{n, v} [(1 − δ) (1 − p_{0,v})^γ (−t_{0,v} log p_{0,v})
///   + δ (−t_{1,v} log p_{1,v})]`;
/// - the asymmetric focal Tversky part, per sample `n` and class `c`:
///   `TP = Σ_v t p`, `FN = Σ_v t (1 − p)`, `FP = Σ_v (1 − t) p`,
///   `TI_c = (TP + ε) / (TP + δ FN + (1 − δ) FP + ε)`, then
///   `AFT = (1/(2N)) Σ_n [(1 − TI_0) + (1 − TI_1)^{1−γ}]`.
///
/// Defaults as MONAI's: `w = 0.5`, `γ = 0.5`, `δ = 0.7`. Equals
/// `AsymmetricUnifiedFocalLoss(to_onehot_y=True)(softmax(z, dim=1), y)` with `y` of shape
/// `(N, 1, …)`: MONAI applies no activation itself (its docstring's "logits … transformed by a
/// sigmoid" is not what its code does; it clamps its input as probabilities), so it takes
/// probabilities. For two classes `softmax(z)₁ = sigmoid(z₁ − z₀)`, MONAI's one-channel form.
/// MONAI's `ignore_index` and `reduction` are left out (the value is a scalar either way).
///
/// Refuses (with [`LossError::Config`]) logits of other than 2 classes (MONAI's loss is binary
/// only: it reads channels 0 and 1 and one-hot encodes with `num_classes=2`), region targets,
/// and `w`, `γ`, `δ` outside `[0, 1]` (`γ > 1` makes the Tversky exponent negative). `1 − TI` is
/// computed as `(δ FN + (1 − δ) FP) / (TP + δ FN + (1 − δ) FP + ε)` (the same number without the
/// cancellation), held at least 10⁻³⁰ under the power, so gradients stay finite at `δ ∈ {0, 1}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnifiedFocal {
    /// Weight `w` of the focal part (the Tversky part gets `1 − w`), in `[0, 1]`.
    pub weight: f64,
    /// `γ`, in `[0, 1]`: the background's focal exponent and `1 −` the foreground's Tversky
    /// exponent.
    pub gamma: f64,
    /// `δ`, in `[0, 1]`: the weight of the foreground cross-entropy and of false negatives
    /// (`1 − δ`: of the background cross-entropy and of false positives).
    pub delta: f64,
}

impl Default for UnifiedFocal {
    fn default() -> Self {
        UnifiedFocal {
            weight: 0.5,
            gamma: 0.5,
            delta: 0.7,
        }
    }
}

/// `v` as a message shows it: as written for everyday magnitudes, in exponent form beyond
/// (`1e300`, not its 301 digits).
fn short(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || (1e-4..1e6).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

impl UnifiedFocal {
    /// The settings out of `[0, 1]`, as `name = value` (empty when all are valid).
    pub(crate) fn out_of_range(&self) -> Vec<String> {
        [
            ("weight", self.weight),
            ("gamma", self.gamma),
            ("delta", self.delta),
        ]
        .into_iter()
        .filter(|(_, v)| !(v.is_finite() && (0.0..=1.0).contains(v)))
        .map(|(name, v)| format!("{name} = {}: must be in [0, 1]", short(v)))
        .collect()
    }

    fn check(&self, logits: &Tensor) -> Result<()> {
        if let Some(bad) = self.out_of_range().into_iter().next() {
            return Err(LossError::Config {
                loss: "unified_focal",
                what: bad,
            });
        }
        if logits.rank() == 5 && logits.dim(1)? != 2 {
            return Err(LossError::Config {
                loss: "unified_focal",
                what: format!(
                    "binary only (as MONAI's AsymmetricUnifiedFocalLoss): needs 2 classes, got {}",
                    logits.dim(1)?
                ),
            });
        }
        Ok(())
    }

    /// The value from probabilities `p` (clamped here) and one-hot targets `t`, `(N, 2, …)`.
    fn value(&self, p: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (gamma, delta) = (self.gamma, self.delta);
        let p = p.clamp(EPSILON, 1.0 - EPSILON)?;
        let (p0, p1) = (p.narrow(1, 0, 1)?, p.narrow(1, 1, 1)?);
        let (t0, t1) = (t.narrow(1, 0, 1)?, t.narrow(1, 1, 1)?);

        // AF: the mean over both channels' terms
        let back_ce = (p0.affine(-1.0, 1.0)?.powf(gamma)? * (&t0 * p0.log()?)?)?;
        let fore_ce = (&t1 * p1.log()?)?;
        let focal_sum = (back_ce.sum_all()?.affine(-(1.0 - delta), 0.0)?
            + fore_ce.sum_all()?.affine(-delta, 0.0)?)?;
        let focal = focal_sum.affine(1.0 / p.elem_count() as f64, 0.0)?;

        // AFT: per sample and class
        let per_class = |x: Tensor| -> Result<Tensor> { Ok(x.flatten_from(2)?.sum(2)?) };
        let tp = per_class((t * &p)?)?;
        let fn_ = per_class((t * p.affine(-1.0, 1.0)?)?)?;
        let fp = per_class((t.affine(-1.0, 1.0)? * &p)?)?;
        let mismatch = (fn_.affine(delta, 0.0)? + fp.affine(1.0 - delta, 0.0)?)?;
        let one_minus_ti = (&mismatch / (tp + mismatch.affine(1.0, EPSILON)?)?)?;
        let back_t = one_minus_ti.narrow(1, 0, 1)?;
        let fore_t = one_minus_ti
            .narrow(1, 1, 1)?
            .maximum(1e-30)?
            .powf(1.0 - gamma)?;
        let samples = one_minus_ti.dim(0)? as f64;
        let tversky =
            (back_t.sum_all()? + fore_t.sum_all()?)?.affine(1.0 / (2.0 * samples), 0.0)?;

        Ok((focal.affine(self.weight, 0.0)? + tversky.affine(1.0 - self.weight, 0.0)?)?)
    }
}

impl Loss for UnifiedFocal {
    fn name(&self) -> &'static str {
        "unified_focal"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        refuse_regions(target, "unified_focal")?;
        self.check(logits)?;
        let prepared = Prepared::new(logits, target)?;
        self.value(&prepared.probs()?, &prepared.onehot)
    }
}
