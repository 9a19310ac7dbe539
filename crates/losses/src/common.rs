//! Pieces every loss shares: log-probabilities, one-hot targets, smoothing constants.

use candle_core::{D, Tensor};

use crate::target::{Target, one_hot};
use crate::Result;

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

    /// `ℓ_v = −log p_{v, y_v}`, `(N, D, H, W)`.
    pub fn nll(&self) -> Result<Tensor> {
        Ok((&self.logp * &self.onehot)?.sum(1)?.neg()?)
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

/// Sum over all axes but the first two of `(N, K, …)`, then over the batch when `batch`:
/// `(N, K)` or `(1, K)`.
pub(crate) fn class_sums(x: &Tensor, batch: bool) -> Result<Tensor> {
    let s = x.flatten_from(2)?.sum(D::Minus1)?;
    Ok(if batch { s.sum_keepdim(0)? } else { s })
}
