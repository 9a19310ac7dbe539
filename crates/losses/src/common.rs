//! Pieces every loss shares: log-probabilities, one-hot targets, smoothing constants.

use candle_core::Tensor;

use crate::Result;
use crate::target::{ContourConfig, Target, one_hot};

/// The quantities of one forward pass: `logp = log_softmax(z)` over classes (never
/// `log(softmax(z))`), `t = onehot(y)`, both `(N, K, D, H, W)`, and the `u32` labels.
pub(crate) struct Prepared {
    pub labels: Tensor,
    pub logp: Tensor,
    pub onehot: Tensor,
    pub classes: usize,
}

impl Prepared {
    pub fn new(logits: &Tensor, target: &Target) -> Result<Self> {
        let labels = target.checked_labels(logits)?;
        let classes = logits.dim(1)?;
        let max = logits.max_keepdim(1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let logsum = shifted.exp()?.sum_keepdim(1)?.log()?;
        let logp = shifted.broadcast_sub(&logsum)?;
        let onehot = one_hot(&labels, classes, logits.dtype())?;
        Ok(Prepared {
            labels,
            logp,
            onehot,
            classes,
        })
    }

    /// `p = softmax(z) = exp(logp)`.
    pub fn probs(&self) -> Result<Tensor> {
        Ok(self.logp.exp()?)
    }

    /// Drops the background channel of `(N, K, …)` unless `include_background`.
    pub fn foreground(x: &Tensor, include_background: bool) -> Result<Tensor> {
        Ok(if include_background {
            x.clone()
        } else {
            x.narrow(1, 1, x.dim(1)? - 1)?
        })
    }
}

/// Mean over every element.
pub(crate) fn mean(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean_all()?)
}

/// Which implementation of the fused reductions runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused parallel CPU kernels on the CPU, candle operations elsewhere.
    #[default]
    Auto,
    /// Candle operations everywhere (what CUDA runs; for tests and comparisons).
    Composite,
}

/// The reductions of one forward pass (see `fused`): per-class statistics and weighted NLL
/// sums, on the fast path where there is one.
pub(crate) struct Reductions<'a> {
    pub logits: &'a Tensor,
    pub labels: Tensor,
    pub target: &'a Target,
    pub classes: usize,
    fused: bool,
}

impl<'a> Reductions<'a> {
    pub fn new(logits: &'a Tensor, target: &'a Target) -> Result<Self> {
        let labels = target.checked_labels(logits)?;
        let fused = target.kernels() == Kernels::Auto
            && logits.device().is_cpu()
            && matches!(
                logits.dtype(),
                candle_core::DType::F32 | candle_core::DType::F64
            );
        Ok(Reductions {
            logits,
            labels,
            target,
            classes: logits.dim(1)?,
            fused,
        })
    }

    /// `(N, K, 6)` statistics (`fused::stat`), with the optional per-voxel map.
    pub fn stats(&self, map: Option<&Tensor>) -> Result<Tensor> {
        if self.fused {
            crate::fused::class_stats(self.logits, &self.labels, map)
        } else {
            crate::fused::composite::class_stats(self.logits, &self.labels, map)
        }
    }

    /// `(N,)` per-sample `Σ_v w_v ℓ_v`.
    pub fn nll_sums(&self, weights: &Tensor) -> Result<Tensor> {
        if self.fused {
            crate::fused::weighted_nll(self.logits, &self.labels, weights)
        } else {
            crate::fused::composite::weighted_nll(self.logits, &self.labels, weights)
        }
    }

    /// The edge map for `contour` in the logits' dtype: given with the target, or computed
    /// (with `cwseg-morphology` on the CPU fast path, online elsewhere: bit-identical).
    pub fn edges(&self, contour: &ContourConfig) -> Result<Tensor> {
        self.target
            .edges(&self.labels, contour, self.logits, self.fused)
    }

    /// Voxels `|V| = N·D·H·W`.
    pub fn voxels(&self) -> usize {
        self.labels.elem_count()
    }
}

/// One statistic `(N, K)` of `(N, K, 6)`, background dropped unless `include_background`.
pub(crate) fn statistic(stats: &Tensor, which: usize, include_background: bool) -> Result<Tensor> {
    let s = stats.narrow(2, which, 1)?.squeeze(2)?;
    Prepared::foreground(&s, include_background)
}
