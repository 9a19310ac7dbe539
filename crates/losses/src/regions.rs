//! Region-based training (nnU-Net's BraTS setting): one sigmoid output per region, a region
//! being a set of classes.
//!
//! Regions `R_j` (sets of class indices), targets `t_j = [y ∈ R_j]`, outputs
//! `q_j = sigmoid(z_j)`; per voxel the binary cross-entropy, from the logits,
//! `b_{j,v} = max(z, 0) − z t + log(1 + e^{−|z|})`. Every loss of the zoo that is made of the
//! sums `I = Σ q t`, `P = Σ q`, `G = Σ t`, their contour parts and the weighted cross-entropy
//! has a region form: the same formula with `(q_j, t_j)` in place of `(p_k, t_k)`, every region
//! counted (no background channel exists), and the cross-entropy family averaged over regions
//! and voxels, `(1/(J|V|)) Σ_j Σ_v w_{j,v} b_{j,v}`. The contour map of region `j` is the
//! contour map of the binary mask `t_j` with the background counted (a band on both sides of
//! the region's boundary), so CWCE's weight is `1 + λ C^j_v` and SDL's contour of region `j`
//! is `C^j ∧ t_j`.

use candle_core::{D, DType, Tensor};

use crate::{LossError, Result};
use cwseg_ops::loss_sums::{STATS, stat};

/// Regions as sets of class indices, among `classes` classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regions {
    sets: Vec<Vec<u32>>,
    classes: usize,
}

impl Regions {
    /// Regions `sets` of class indices in `0..classes`: at least one region, none empty, none
    /// holding an index out of range.
    pub fn new(sets: Vec<Vec<u32>>, classes: usize) -> Result<Self> {
        let bad = |what: String| LossError::Config {
            loss: "regions",
            what,
        };
        if sets.is_empty() {
            return Err(bad("no regions".into()));
        }
        for (j, set) in sets.iter().enumerate() {
            if set.is_empty() {
                return Err(bad(format!("region {j} holds no class")));
            }
            if let Some(&c) = set.iter().find(|&&c| c as usize >= classes) {
                return Err(bad(format!(
                    "region {j} holds class {c}, but there are {classes} classes"
                )));
            }
        }
        Ok(Regions { sets, classes })
    }

    /// The number of regions `J`.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// Never: a region set has at least one region.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// The number of classes the labels index.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The class sets.
    pub fn sets(&self) -> &[Vec<u32>] {
        &self.sets
    }

    /// `[y ∈ R_j]` of `u32` labels `(N, D, H, W)` as `u32` `(N, D, H, W)` (0 or 1).
    pub fn mask(&self, labels: &Tensor, j: usize) -> Result<Tensor> {
        let mut mask = labels.zeros_like()?;
        for &c in &self.sets[j] {
            mask = mask.maximum(&labels.eq(c)?.to_dtype(DType::U32)?)?;
        }
        Ok(mask)
    }

    /// Targets `t = (t_1 … t_J)` `(N, J, D, H, W)` in `dtype`.
    pub fn targets(&self, labels: &Tensor, dtype: DType) -> Result<Tensor> {
        let masks = (0..self.len())
            .map(|j| Ok(self.mask(labels, j)?.to_dtype(dtype)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&masks, 1)?)
    }
}

fn sums(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(2)?.sum(D::Minus1)?)
}

/// `b = max(z, 0) − z t + log(1 + e^{−|z|})`, the binary cross-entropy of `sigmoid(z)` against
/// `t`, stable for any logit.
pub(crate) fn binary_cross_entropy(logits: &Tensor, t: &Tensor) -> Result<Tensor> {
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((logits.relu()? - (logits * t)?)? + softplus)?)
}

/// The `(N, J, 7)` sums of the region form in the layout of `cwseg_ops::loss_sums::stat`:
/// `I = Σ q t`, `P = Σ q`, `P2 = Σ q²`, `G = Σ t`, `I_E = Σ E q t`, `G_E = Σ E t`, and
/// `NLL = Σ_v w_{j,v} b_{j,v} / J` (over every voxel: each region is a two-class problem). `edges`
/// is `(N, J, D, H, W)`; `weights` is `(N, D, H, W)` or `(N, J, D, H, W)`.
pub(crate) fn reduce(
    logits: &Tensor,
    labels: &Tensor,
    regions: &Regions,
    edges: Option<&Tensor>,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let t = regions.targets(labels, logits.dtype())?;
    let q = sigmoid(logits)?;
    let qt = (&q * &t)?;
    let zeros = sums(&t)?.zeros_like()?;
    let (ie, ge) = match edges {
        Some(e) => (sums(&(&qt * e)?)?, sums(&(&t * e)?)?),
        None => (zeros.clone(), zeros.clone()),
    };
    let nll = match weights {
        Some(w) => {
            let w = if w.rank() == 4 {
                w.unsqueeze(1)?
            } else {
                w.clone()
            };
            let b = binary_cross_entropy(logits, &t)?;
            sums(&b.broadcast_mul(&w)?)?.affine(1.0 / regions.len() as f64, 0.0)?
        }
        None => zeros,
    };
    let mut parts = vec![nll.clone(); STATS];
    parts[stat::I] = sums(&qt)?;
    parts[stat::P] = sums(&q)?;
    parts[stat::P2] = sums(&q.sqr()?)?;
    parts[stat::G] = sums(&t)?;
    parts[stat::IE] = ie;
    parts[stat::GE] = ge;
    parts[stat::NLL] = nll;
    Ok(Tensor::stack(&parts, 2)?)
}

/// `sigmoid(z) = 1 / (1 + e^{−z})`, differentiable (candle's own op has no gradient on every
/// version): `e^{min(z,0)} / (1 + e^{−|z|})`, stable for any logit.
fn sigmoid(z: &Tensor) -> Result<Tensor> {
    let numerator = z.minimum(0.0)?.exp()?;
    let denominator = (z.abs()?.neg()?.exp()? + 1.0)?;
    Ok((numerator / denominator)?)
}
