//! The cross-entropy family (formulas §3): every voxel counts, background included.

use candle_core::{DType, Tensor};
use cwseg_morphology::DwceSpec;
use serde::{Deserialize, Serialize};

use crate::common::{Prepared, Reductions, mean};
use crate::target::{ContourConfig, Target};
use crate::{Loss, LossError, Result};

/// Cross-entropy `CE = Σ_v w_{y_v} ℓ_v / Σ_v w_{y_v}` with `ℓ_v = −log p_{v,y_v}`; without
/// class weights the mean `(1/|V|) Σ_v ℓ_v`. Voxels labelled `ignore_index` are left out.
/// Matches `torch.nn.CrossEntropyLoss(weight, ignore_index)`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossEntropy {
    /// Per-class weights `w` (length K), none by default.
    pub class_weights: Option<Vec<f64>>,
    /// A label whose voxels are ignored.
    pub ignore_index: Option<u32>,
}

impl CrossEntropy {
    pub(crate) fn value(&self, r: &Reductions) -> Result<Tensor> {
        let (weights, total) = self.voxel_weights(r)?;
        self.value_with(r, &weights, total)
    }

    /// Per-voxel weights `w_{y_v}` (0 for ignored voxels) and their sum.
    pub(crate) fn voxel_weights(&self, r: &Reductions) -> Result<(Tensor, f64)> {
        if r.regions().is_some() && self.class_weights.is_some() {
            return Err(LossError::Config {
                loss: "ce",
                what:
                    "class_weights have no region form (each region is its own two-class problem)"
                        .into(),
            });
        }
        // the label classes (in the region form, the labels' classes, not the outputs)
        let k = r.regions().map_or(r.classes, |g| g.classes());
        let dtype = r.logits.dtype();
        let weights = if self.class_weights.is_none() && self.ignore_index.is_none() {
            r.labels.ones_like()?.to_dtype(dtype)?
        } else {
            let mut per_class = self.class_weights.clone().unwrap_or_else(|| vec![1.0; k]);
            if per_class.len() != k {
                return Err(LossError::Config {
                    loss: "ce",
                    what: format!("{} class weights for {k} classes", per_class.len()),
                });
            }
            if let Some(w) = self
                .ignore_index
                .and_then(|i| per_class.get_mut(i as usize))
            {
                *w = 0.0;
            }
            let per_class = Tensor::from_vec(per_class, k, r.logits.device())?.to_dtype(dtype)?;
            per_class
                .index_select(&r.labels.flatten_all()?, 0)?
                .reshape(r.labels.shape())?
        };
        let total = weights
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        Ok((weights, total))
    }

    pub(crate) fn value_with(
        &self,
        r: &Reductions,
        weights: &Tensor,
        total: f64,
    ) -> Result<Tensor> {
        let sum = r.nll_sums(weights)?.sum_all()?;
        // Every voxel ignored: 0, still a finite loss with a (zero) gradient.
        let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
        Ok(sum.affine(scale, 0.0)?)
    }
}

impl Loss for CrossEntropy {
    fn name(&self) -> &'static str {
        "ce"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        self.value(&Reductions::new(logits, target)?)
    }
}

/// Which formula a contour-weighted loss follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The paper's text (formulas §2–4).
    #[default]
    Paper,
    /// The paper's public reference code, exactly.
    Reference,
}

/// Contour-weighted cross-entropy (paper eq. 10):
/// `CWCE = (1/|V|) Σ_v (1 + λ C_v) ℓ_v`, λ = 1, `C` the contour map of formulas §1 with the
/// background counted (a band on both sides of every boundary), cube 3, 6 iterations.
/// Preset `reference`: `(1/|V|) Σ_v (2 + 2 C_v) ℓ_v`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContourWeightedCrossEntropy {
    /// Weight λ of the contour voxels.
    pub lambda: f64,
    /// Count class 0's contour too (default true, formulas §3).
    pub include_background: bool,
    /// The contour settings.
    pub contour: ContourConfig,
    /// `paper` or `reference`.
    pub preset: Preset,
}

impl Default for ContourWeightedCrossEntropy {
    fn default() -> Self {
        ContourWeightedCrossEntropy {
            lambda: 1.0,
            include_background: true,
            contour: ContourConfig::default(),
            preset: Preset::Paper,
        }
    }
}

impl ContourWeightedCrossEntropy {
    /// The value, given the edge map `E` of the loss's contour settings.
    pub(crate) fn value(&self, r: &Reductions, edges: &Tensor) -> Result<Tensor> {
        let weights = self.voxel_weights(r, edges)?;
        self.value_with(r, &weights)
    }

    /// `1 + λ C_v` (or `2 + 2 C_v`).
    pub(crate) fn voxel_weights(&self, r: &Reductions, edges: &Tensor) -> Result<Tensor> {
        self.contour.validate("cwce")?;
        let contour = if self.include_background {
            edges.clone()
        } else {
            (edges * r.inside(edges.dtype())?)?
        };
        Ok(match self.preset {
            Preset::Paper => contour.affine(self.lambda, 1.0)?,
            Preset::Reference => contour.affine(2.0, 2.0)?,
        })
    }

    pub(crate) fn value_with(&self, r: &Reductions, weights: &Tensor) -> Result<Tensor> {
        Ok(r.nll_sums(weights)?
            .sum_all()?
            .affine(1.0 / r.voxels() as f64, 0.0)?)
    }
}

impl Loss for ContourWeightedCrossEntropy {
    fn name(&self) -> &'static str {
        "cwce"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        self.contour.validate("cwce")?;
        let r = Reductions::new(logits, target)?;
        self.value(&r, &r.edges(&self.contour)?)
    }
}

/// Distance-weighted cross-entropy (Ronneberger 2015, the paper's DWCE baseline):
/// `(1/|V|) Σ_v m_v ℓ_v`, `m_v = w_c(y_v) + w0 · exp(−(d1_v + d2_v)² / (2σ²))`, w0 = 10,
/// σ = 5 voxels, `w_c` inverse class frequency with `Σ_v w_c(y_v) = |V|`
/// (`cwseg_morphology::dwce_weight_map`, computed on the CPU unless the target carries it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistanceWeightedCrossEntropy {
    /// Weight of the separation term.
    pub w0: f64,
    /// Width of the separation term, voxels.
    pub sigma: f64,
    /// Inverse-frequency class weights (else 1).
    pub class_balance: bool,
}

impl Default for DistanceWeightedCrossEntropy {
    fn default() -> Self {
        let spec = DwceSpec::default();
        DistanceWeightedCrossEntropy {
            w0: spec.w0,
            sigma: spec.sigma,
            class_balance: spec.class_balance,
        }
    }
}

impl DistanceWeightedCrossEntropy {
    /// The weight map's settings (`cwseg_morphology::dwce_weight_map`).
    pub fn spec(&self) -> DwceSpec {
        DwceSpec {
            w0: self.w0,
            sigma: self.sigma,
            class_balance: self.class_balance,
            ..DwceSpec::default()
        }
    }
}

impl Loss for DistanceWeightedCrossEntropy {
    fn name(&self) -> &'static str {
        "dwce"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let r = Reductions::new(logits, target)?;
        let weights = target.dwce_weights(&r.labels, &self.spec(), logits)?;
        Ok(r.nll_sums(&weights)?
            .sum_all()?
            .affine(1.0 / r.voxels() as f64, 0.0)?)
    }
}

/// Focal loss (Lin 2017), softmax form: `(1/|V|) Σ_v −(1 − p_{v,y_v})^γ log p_{v,y_v}`, γ = 2.
/// MONAI's `FocalLoss(use_softmax=True, gamma=2, reduction="mean")` averages over the K
/// channels too: its value is this one divided by K.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Focal {
    /// Focusing parameter γ ≥ 0.
    pub gamma: f64,
}

impl Default for Focal {
    fn default() -> Self {
        Focal { gamma: 2.0 }
    }
}

impl Focal {
    pub(crate) fn value(&self, p: &Prepared) -> Result<Tensor> {
        let logpt = (&p.logp * &p.onehot)?.sum(1)?;
        let pt = logpt.exp()?;
        // (1 − p)^γ with 1 − p clamped at 0 against rounding (p ≤ 1 up to an ulp).
        let mut one_minus = pt.affine(-1.0, 1.0)?.relu()?;
        if self.gamma < 1.0 {
            // d/dx x^γ is infinite at 0 for γ < 1: keep the base off 0.
            one_minus = one_minus.affine(1.0, 1e-20)?;
        }
        let modulation = if self.gamma == 0.0 {
            one_minus.ones_like()?
        } else {
            one_minus.powf(self.gamma)?
        };
        mean(&(modulation * logpt)?.neg()?)
    }
}

impl Loss for Focal {
    fn name(&self) -> &'static str {
        "focal"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(LossError::Config {
                loss: "focal",
                what: format!("gamma must be finite and ≥ 0, got {}", self.gamma),
            });
        }
        self.value(&Prepared::new(logits, target)?)
    }
}
