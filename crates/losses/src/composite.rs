//! The loss sums of `cwseg_ops::loss_sums` (`(N, K, 7)`: `I`, `P`, `P2`, `G`, `I_E`, `G_E`,
//! `NLL` per sample and class) from candle operations, for every device and dtype; the CPU
//! custom op and the CUDA kernels of `cwseg-ops` agree with them to rounding.
use candle_core::{D, Tensor};

use crate::Result;
use crate::target::one_hot;
use cwseg_ops::loss_sums::{STATS, stat};

fn sums(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(2)?.sum(D::Minus1)?)
}

/// `log_softmax` over the class axis, from the logits (never `log(softmax)`).
pub(crate) fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let logsum = shifted.exp()?.sum_keepdim(1)?.log()?;
    Ok(shifted.broadcast_sub(&logsum)?)
}

/// See `cwseg_ops::loss_sums::reduce`.
pub(crate) fn reduce(
    logits: &Tensor,
    labels: &Tensor,
    edges: Option<&Tensor>,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let logp = log_softmax(logits)?;
    let p = logp.exp()?;
    let t = one_hot(labels, logits.dim(1)?, logits.dtype())?;
    let pt = (&p * &t)?;
    let zeros = sums(&t)?.zeros_like()?;
    let (ie, ge) = match edges {
        Some(e) => {
            let e = e.unsqueeze(1)?;
            (sums(&pt.broadcast_mul(&e)?)?, sums(&t.broadcast_mul(&e)?)?)
        }
        None => (zeros.clone(), zeros.clone()),
    };
    let nll = match weights {
        Some(w) => sums(&(logp * &t)?.broadcast_mul(&w.unsqueeze(1)?)?)?.neg()?,
        None => zeros,
    };
    let mut parts = vec![nll.clone(); STATS];
    parts[stat::I] = sums(&pt)?;
    parts[stat::P] = sums(&p)?;
    parts[stat::P2] = sums(&p.sqr()?)?;
    parts[stat::G] = sums(&t)?;
    parts[stat::IE] = ie;
    parts[stat::GE] = ge;
    parts[stat::NLL] = nll;
    Ok(Tensor::stack(&parts, 2)?)
}
