//! Attention on the CPU: `O = softmax(s·q kᵀ + B + M) v` as one op whose autograd node keeps
//! only `q`, `k`, `v` (one `(3, S, h, n, d)` tensor) and the bias `B` `(h, n, n)`: the
//! probabilities `P`, `S·h·n²` values per block (SwinUNETR's first stage: 353 MB), are made in
//! the forward pass and again in the backward pass, never kept between them — the memory of
//! flash attention, with candle's matrix products. `M` `(W, n, n)` is an optional constant
//! mask added to every group of `W` consecutive samples (a shifted window's); `s` the scale.
//!
//! The backward, with `G = ∂L/∂O`: `∂v = Pᵀ G`, `∂P = G vᵀ`,
//! `∂Z = P ⊙ (∂P − rowsum(∂P ⊙ P))` for the logits `Z`, `∂q = s ∂Z k`, `∂k = s ∂Zᵀ q`,
//! `∂B = Σ_samples ∂Z`.
//!
//! [`attention_probabilities`] is the same logits' softmax alone as one op that keeps `P` (the
//! path with attention dropout, which needs `P` itself).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};

use crate::fused::{cpu_f32, softmax_backward, softmax_last, take_precomputed};

/// `P = softmax(s·q kᵀ + B + M)` of detached operands, `q`, `k` `(S, h, n, d)`, `S` a multiple
/// of the mask's `W` (checked by the callers).
pub(crate) fn probabilities(
    q: &Tensor,
    k: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let mut logits = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias.reshape((1, h, n, m))?)?;
    if let Some(mask) = mask {
        let windows = mask.dim(0)?;
        logits = logits
            .reshape((b / windows, windows, h, n, m))?
            .broadcast_add(&mask.reshape((1, windows, 1, n, m))?)?
            .reshape((b, h, n, m))?;
    }
    match softmax_last(&logits)? {
        Some(p) => Ok(p),
        None => bail!("attention: the fused softmax takes CPU f32 logits"),
    }
}

/// `q`, `k`, `v`, detached and contiguous, from `(3, S, h, n, d)`.
fn split(qkv: &Tensor) -> Result<[Tensor; 3]> {
    let part = |i: usize| qkv.detach().get(i)?.contiguous();
    Ok([part(0)?, part(1)?, part(2)?])
}

struct Attention {
    mask: Option<Tensor>,
    scale: f64,
    /// The forward's result, moved out by `cpu_fwd`.
    output: Mutex<Option<Tensor>>,
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "cwseg-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_precomputed(&self.output, "attention")
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [q, k, v] = split(qkv)?;
        let p = probabilities(&q, &k, &bias.detach(), self.mask.as_ref(), self.scale)?;
        let grad = grad.contiguous()?;
        let dv = p.transpose(2, 3)?.contiguous()?.matmul(&grad)?;
        let dz = softmax_backward(&p, &grad.matmul(&v.t()?)?)?;
        drop(p);
        let dq = (dz.matmul(&k)? * self.scale)?;
        let dk = (dz.transpose(2, 3)?.contiguous()?.matmul(&q)? * self.scale)?;
        let dbias = dz.sum(0)?.reshape(bias.shape())?;
        Ok((Some(Tensor::stack(&[dq, dk, dv], 0)?), Some(dbias)))
    }
}

/// `softmax(s·q kᵀ + B + M) v` ([`Attention`]) on CPU f32: `qkv` `(3, S, h, n, d)`, `bias`
/// `(h, n, n)`, `mask` `(W, n, n)` with `S` a multiple of `W`; `None` elsewhere (the caller's
/// composite).
pub(crate) fn attention(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !(cpu_f32(qkv) && cpu_f32(bias) && mask.is_none_or(cpu_f32)) || qkv.rank() != 5 {
        return Ok(None);
    }
    let (three, b, h, n, _) = qkv.dims5()?;
    if three != 3 || bias.dims() != [h, n, n] {
        return Ok(None);
    }
    if let Some(mask) = mask {
        let windows = mask.dim(0)?;
        if windows == 0 || !b.is_multiple_of(windows) || mask.dims() != [windows, n, n] {
            return Ok(None);
        }
    }
    let qkv = qkv.contiguous()?;
    let mask = mask.map(Tensor::detach);
    let [q, k, v] = split(&qkv)?;
    let p = probabilities(&q, &k, &bias.detach(), mask.as_ref(), scale)?;
    let output = p.matmul(&v)?;
    drop(p);
    let op = Attention {
        mask,
        scale,
        output: Mutex::new(Some(output)),
    };
    Ok(Some(qkv.apply_op2(&bias.contiguous()?, op)?))
}

/// Attention's probabilities `P = softmax(q kᵀ + B + M)` over the last axis, for `q`, `k`
/// `(S, h, n, d)`, a bias `B` `(h, n, n)` (a relative position bias: it gets a gradient) and
/// an optional constant mask `M` `(W, n, n)` added to every group of `W` consecutive samples
/// (a shifted window's, one per window position: no gradient). The forward runs candle's
/// matrix product and the fused softmax on detached operands and hands their result to this
/// op, so the autograd graph keeps `P` and the small `q`, `k`, `B` — not the score matrix and
/// its biased copy, each as large as `P`, nor a `(W, h, n, n)` sum of bias and mask. The
/// backward: `S = P ⊙ (G − rowsum(G ⊙ P))`, `∂q = S k`, `∂k = Sᵀ q`, `∂B = Σ_samples S`.
struct AttentionProbabilities {
    /// The forward's result, moved out by `cpu_fwd` (so that it is not held twice).
    probabilities: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp3 for AttentionProbabilities {
    fn name(&self) -> &'static str {
        "cwseg-attention-probabilities"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_precomputed(&self.probabilities, "attention probabilities")
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = softmax_backward(res, &grad.contiguous()?)?;
        let dq = s.matmul(k)?;
        let dk = s.transpose(2, 3)?.contiguous()?.matmul(q)?;
        let dbias = s.sum(0)?.reshape(bias.shape())?;
        Ok((Some(dq), Some(dk), Some(dbias)))
    }
}

/// `softmax(q kᵀ + B + M)` ([`AttentionProbabilities`]) on CPU f32, `B` `(h, n, n)`, `M`
/// `(W, n, n)` with the samples a multiple of `W`; `None` elsewhere (the caller's composite).
pub(crate) fn attention_probabilities(
    q: &Tensor,
    k: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(bias) && mask.is_none_or(cpu_f32)) {
        return Ok(None);
    }
    if let Some(mask) = mask {
        let windows = mask.dim(0)?;
        if windows == 0 || !q.dim(0)?.is_multiple_of(windows) {
            return Ok(None);
        }
    }
    let mask = mask.map(Tensor::detach);
    let p = probabilities(&q.detach(), &k.detach(), &bias.detach(), mask.as_ref(), 1.0)?;
    let op = AttentionProbabilities {
        probabilities: std::sync::Mutex::new(Some(p)),
    };
    Ok(Some(q.apply_op3(k, bias, op)?))
}
