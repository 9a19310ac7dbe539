//! CPU kernels for the element-wise layers the networks call most, as custom ops with their
//! backward passes: batch normalisation in training mode, ReLU, ELU, GELU, PReLU and the per-channel
//! bias of the convolutions. The composites of candle
//! operations they replace allocate a tensor per step (≈ 6 for batch norm's forward, more for
//! its backward); these read and write each value once or twice.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    bail,
};
use rayon::prelude::*;

/// Runs `f` on the contiguous f32 data of `t`.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_values::<f32, R>(t, f)
}

/// Runs `f` on the contiguous data of `t`, of dtype `T` on the CPU.
pub(crate) fn with_values<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("expected a contiguous tensor")
    };
    match &*storage {
        Storage::Cpu(cpu) => f(&T::cpu_storage_as_slice(cpu)?[start..end]),
        _ => bail!("expected {:?} data on the CPU", T::DTYPE),
    }
}

/// `len` zeros written by every thread of the pool (a large `vec![0.0; len]` is one thread's
/// `memset` while the others wait: 3 % of a U-Net training step, measured).
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    (0..len).into_par_iter().map(|_| 0.0).collect()
}

pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("expected a contiguous tensor")
    };
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => bail!("expected f32 data"),
    }
}

/// What a normalisation op applies to its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    /// Nothing.
    Identity,
    /// `max(0, ·)`: the gradient is masked by the output before the norm's backward, so the
    /// normalised values are never kept (one node and one tensor fewer than norm, then ReLU).
    Relu,
}

/// Batch normalisation of `(N, C, S…)` with given per-channel mean and inverse standard
/// deviation (the batch statistics), `y = γ (x − μ)·invstd + β`, then `then`; its backward is
/// the batch-norm gradient that accounts for μ and σ depending on `x`.
struct BatchNormTrain {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    n: usize,
    c: usize,
    spatial: usize,
    then: Then,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "cwseg-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let relu = self.then == Then::Relu;
        let y = map_channel_blocks(x, self.spatial, self.c, |c| {
            let scale = gamma[c] * self.invstd[c];
            let shift = beta[c] - self.mean[c] * scale;
            move |v| {
                let y = v * scale + shift;
                if relu { y.max(0.0) } else { y }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let masked;
        let grad = match self.then {
            Then::Identity => grad,
            Then::Relu => {
                masked = backward_from_output(res, grad, |y, g| if y > 0.0 { g } else { 0.0 })?;
                &masked
            }
        };
        let (n, c_n, s) = (self.n, self.c, self.spatial);
        let m = (n * s) as f32;
        let gamma_v: Vec<f32> = gamma.to_vec1()?;
        let (dx, dgamma, dbeta) = with_f32(x, |xv| {
            with_f32(grad, |gv| {
                // per channel: Σ dy and Σ dy·x̂
                let sums: Vec<(f32, f32)> = (0..c_n)
                    .into_par_iter()
                    .map(|c| {
                        let (mut sdy, mut sdyx) = (0f64, 0f64);
                        for b in 0..n {
                            let o = (b * c_n + c) * s;
                            for (&dy, &v) in gv[o..o + s].iter().zip(&xv[o..o + s]) {
                                sdy += dy as f64;
                                sdyx += (dy * (v - self.mean[c]) * self.invstd[c]) as f64;
                            }
                        }
                        (sdy as f32, sdyx as f32)
                    })
                    .collect();
                let mut dx = zeros(xv.len());
                dx.par_chunks_mut(s).enumerate().for_each(|(i, out)| {
                    let c = i % c_n;
                    let o = i * s;
                    let (sdy, sdyx) = sums[c];
                    let k = gamma_v[c] * self.invstd[c] / m;
                    for ((d, &dy), &v) in out.iter_mut().zip(&gv[o..o + s]).zip(&xv[o..o + s]) {
                        let xhat = (v - self.mean[c]) * self.invstd[c];
                        *d = k * (m * dy - sdy - xhat * sdyx);
                    }
                });
                let dgamma: Vec<f32> = sums.iter().map(|p| p.1).collect();
                let dbeta: Vec<f32> = sums.iter().map(|p| p.0).collect();
                Ok((dx, dgamma, dbeta))
            })
        })?;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dgamma, c_n, device)?),
            Some(Tensor::from_vec(dbeta, c_n, device)?),
        ))
    }
}

/// Training-mode batch norm on a contiguous-able CPU f32 `(N, C, S…)` tensor with affine
/// parameters, then `then`: `(y, batch mean, biased batch variance)`.
pub(crate) fn batch_norm_train_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    then: Then,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    let dims = x.dims();
    let (n, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    let count = (n * spatial) as f64;
    let stats: Vec<(f32, f32)> = with_f32(x, |xv| {
        Ok((0..c)
            .into_par_iter()
            .map(|ch| {
                let (mut sum, mut sum2) = (0f64, 0f64);
                for b in 0..n {
                    let o = (b * c + ch) * spatial;
                    for &v in &xv[o..o + spatial] {
                        sum += v as f64;
                        sum2 += (v as f64) * (v as f64);
                    }
                }
                let mean = sum / count;
                ((mean) as f32, (sum2 / count - mean * mean).max(0.0) as f32)
            })
            .collect())
    })?;
    let mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
    let var: Vec<f32> = stats.iter().map(|s| s.1).collect();
    let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
    let op = BatchNormTrain {
        mean: mean.clone(),
        invstd,
        n,
        c,
        spatial,
        then,
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    Ok((y, mean, var))
}

/// Whether the fused CPU kernels apply to `x`.
pub(crate) fn cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `max(0, x)`; the gradient passes where the output is positive.
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "cwseg-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = map_values(f32_slice(storage, layout)?, |v| v.max(0.0));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = backward_from_output(res, grad, |y, g| if y > 0.0 { g } else { 0.0 })?;
        Ok(Some(d))
    }
}

/// `f` of every value, in parallel.
fn map_values(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    // collected in place by rayon: every value written once, no zeroing pass first
    x.par_iter().with_min_len(1 << 16).map(|&v| f(v)).collect()
}

/// `y = f_c(x)` for `(N, C, S…)` values stored as blocks of `spatial` values (block `i` of
/// channel `i % channels`), in parallel over blocks; `per_channel(c)` makes `f_c` once per block.
fn map_channel_blocks<F: Fn(f32) -> f32>(
    x: &[f32],
    spatial: usize,
    channels: usize,
    per_channel: impl Fn(usize) -> F + Sync,
) -> Vec<f32> {
    let mut y = zeros(x.len());
    y.par_chunks_mut(spatial.max(1))
        .zip(x.par_chunks(spatial.max(1)))
        .enumerate()
        .for_each(|(block, (o, i))| {
            let f = per_channel(block % channels.max(1));
            for (v, &u) in o.iter_mut().zip(i) {
                *v = f(u);
            }
        });
    y
}

/// The input gradient of an element-wise op whose derivative is a function of its output:
/// `f(y, g)` for every output value `y` and its gradient `g`, shaped as the output.
fn backward_from_output(
    res: &Tensor,
    grad: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Tensor> {
    let out = with_f32(res, |yv| {
        with_f32(grad, |gv| {
            Ok(gv
                .par_iter()
                .zip(yv)
                .with_min_len(1 << 16)
                .map(|(&g, &y)| f(y, g))
                .collect())
        })
    })?;
    Tensor::from_vec(out, res.shape(), res.device())
}

/// ReLU: the fused kernel on CPU f32, candle's elsewhere.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

/// Softmax over the last axis, `y_i = exp(x_i − max x) / Σ_j exp(x_j − max x)`, one row per
/// task; the backward reads the output alone, `∂L/∂x_i = y_i (g_i − Σ_j g_j y_j)`, so the op
/// keeps its output where the composite (subtract, exp, sum, divide) kept four tensors of the
/// input's size: attention's score matrices are the largest tensors of UNETR and SwinUNETR.
struct SoftmaxLast {
    row: usize,
}

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "cwseg-softmax-last"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let mut y = zeros(x.len());
        y.par_chunks_mut(self.row)
            .zip(x.par_chunks(self.row))
            .for_each(|(o, i)| {
                let max = i.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // the exponentials vectorised, then summed in order
                for (v, &u) in o.iter_mut().zip(i) {
                    *v = exp_non_positive(u - max);
                }
                let sum: f32 = o.iter().sum();
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(res, grad)?))
    }
}

/// The input gradient of a softmax over the last axis from its output `y` and the output's
/// gradient `g`: `y_i (g_i − Σ_j g_j y_j)` per row.
pub(crate) fn softmax_backward(res: &Tensor, grad: &Tensor) -> Result<Tensor> {
    {
        let row = res.dims().last().copied().unwrap_or(1).max(1);
        let out = with_f32(res, |yv| {
            with_f32(grad, |gv| {
                let mut d = zeros(yv.len());
                d.par_chunks_mut(row)
                    .zip(yv.par_chunks(row).zip(gv.par_chunks(row)))
                    .for_each(|(o, (y, g))| {
                        let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                        for ((v, &yi), &gi) in o.iter_mut().zip(y).zip(g) {
                            *v = yi * (gi - dot);
                        }
                    });
                Ok(d)
            })
        })?;
        Tensor::from_vec(out, res.shape(), res.device())
    }
}

/// The output of a custom op computed before the op was applied (on detached operands, so that
/// the graph does not keep their intermediates), moved out of `slot` by the op's `cpu_fwd`; a
/// second call is an error naming `what`.
pub(crate) fn take_precomputed(
    slot: &std::sync::Mutex<Option<Tensor>>,
    what: &str,
) -> Result<(CpuStorage, Shape)> {
    let taken = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: poisoned lock")))?
        .take();
    let Some(t) = taken else {
        bail!("{what} computed twice")
    };
    let values = with_f32(&t, |v| Ok(v.to_vec()))?;
    Ok((CpuStorage::F32(values), t.shape().clone()))
}

/// Softmax over the last axis: the fused kernel on CPU f32, `None` elsewhere (the caller's
/// composite).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Option<Tensor>> {
    let row = x.dims().last().copied().unwrap_or(0);
    if !cpu_f32(x) || row == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SoftmaxLast { row })?))
}

/// LeakyReLU, `x` for `x > 0` and `s·x` otherwise (`s ≥ 0`, so `y` has the sign of `x`); the
/// backward reads the output alone (`∂y/∂x` is 1 where `y > 0`, `s` elsewhere, PyTorch's branch
/// at zero), so the op keeps one tensor where the composite kept five.
struct LeakyRelu {
    slope: f32,
}

impl CustomOp1 for LeakyRelu {
    fn name(&self) -> &'static str {
        "cwseg-leaky-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let slope = self.slope;
        let y = map_values(f32_slice(storage, layout)?, |v| {
            if v > 0.0 { v } else { slope * v }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let slope = self.slope;
        let d = backward_from_output(res, grad, |y, g| if y > 0.0 { g } else { g * slope })?;
        Ok(Some(d))
    }
}

/// LeakyReLU: the fused kernel on CPU f32 with a slope ≥ 0, `None` elsewhere (the caller's
/// composite).
pub(crate) fn leaky_relu(x: &Tensor, slope: f64) -> Result<Option<Tensor>> {
    if !cpu_f32(x) || slope < 0.0 {
        return Ok(None);
    }
    let op = LeakyRelu {
        slope: slope as f32,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// ELU, `x` for `x > 0` and `α (eˣ − 1)` otherwise; the backward reads the output alone
/// (`∂y/∂x` is 1 where `y > 0`, `y + α` elsewhere), so the op keeps one tensor where the
/// composite kept seven.
struct Elu {
    alpha: f32,
}

impl CustomOp1 for Elu {
    fn name(&self) -> &'static str {
        "cwseg-elu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let alpha = self.alpha;
        let x = f32_slice(storage, layout)?;
        let mut y = zeros(x.len());
        y.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(y, x)| {
                // branch-free, so that the loop is vectorised
                for (o, &v) in y.iter_mut().zip(x) {
                    let e = alpha * expm1_non_positive(v.min(0.0));
                    *o = if v > 0.0 || v.is_nan() { v } else { e };
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let alpha = self.alpha;
        let d = backward_from_output(res, grad, |y, g| if y > 0.0 { g } else { g * (y + alpha) })?;
        Ok(Some(d))
    }
}

/// `x ≤ 0` split as `x = n ln 2 + r`, `|r| ≤ ½ ln 2` (Cody–Waite, `n` rounded by adding
/// 1.5·2²³): `(2ⁿ, r)`. Inputs below −87 are taken as −87 (`2ⁿ` stays a normal number).
#[inline(always)]
fn reduce_non_positive(x: f32) -> (f32, f32) {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    (f32::from_bits(((n as i32 + 127) as u32) << 23), r)
}

/// `(eʳ − 1)/r − 1 = r/2 + r²/6 + … + r⁷/8!` by Horner (truncation below 6·10⁻¹⁰ for
/// `|r| ≤ ½ ln 2`).
#[inline(always)]
fn expm1_tail(r: f32) -> f32 {
    let mut p = 1.0 / 40320.0;
    for c in [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ] {
        p = p * r + c;
    }
    p * r
}

/// `eˣ − 1` for `x ≤ 0` without a branch or a call (the C library's `expm1f` is neither
/// vectorised nor inlined: 4 % of V-Net's training step): `eˣ − 1 = 2ⁿ (eʳ − 1) + (2ⁿ − 1)`
/// with `eʳ − 1 = r + r·tail(r)` ([`reduce_non_positive`], [`expm1_tail`]). Inputs below −87
/// give −1, as `eˣ < 2⁻¹²⁵` does in f32; NaN gives −1 (`max` drops it: callers keep it).
#[inline(always)]
fn expm1_non_positive(x: f32) -> f32 {
    let (s, r) = reduce_non_positive(x);
    s * (r + r * expm1_tail(r)) + (s - 1.0)
}

/// `eˣ` for `x ≤ 0` as [`expm1_non_positive`] does it (`2ⁿ (1 + r + r·tail(r))`), NaN kept;
/// inputs below −87 give about 1.6·10⁻³⁸ where the C library's `expf` gives a subnormal or 0
/// (nothing next to a softmax's largest term, 1).
#[inline(always)]
pub(crate) fn exp_non_positive(x: f32) -> f32 {
    let (s, r) = reduce_non_positive(x);
    let e = s * (1.0 + (r + r * expm1_tail(r)));
    if x.is_nan() { x } else { e }
}

/// ELU: the fused kernel on CPU f32, `None` elsewhere (the caller's composite).
pub(crate) fn elu(x: &Tensor, alpha: f64) -> Result<Option<Tensor>> {
    if !cpu_f32(x) {
        return Ok(None);
    }
    let op = Elu {
        alpha: alpha as f32,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// GELU in the erf form, `y = x Φ(x)` with `Φ(x) = ½ (1 + erf(x/√2))` (candle's `erf`, so the
/// values equal candle's `gelu_erf`), in parallel; the backward reads the input,
/// `∂y/∂x = Φ(x) + x φ(x)` with `φ(x) = e^{−x²/2}/√(2π)`, in one pass where candle's backward
/// chains nine element-wise operations, each a tensor and a single-threaded pass.
struct Gelu;

/// `Φ(x)`, the standard normal distribution function.
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "cwseg-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = map_values(f32_slice(storage, layout)?, |v| v * normal_cdf(v));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        // the helper zips any two tensors of one shape: here the input, not the output
        let d = backward_from_output(arg, grad, |x, g| {
            g * (normal_cdf(x) + x * INV_SQRT_2PI * exp_non_positive(-0.5 * x * x))
        })?;
        Ok(Some(d))
    }
}

/// GELU (erf form): the fused kernel on CPU f32, `None` elsewhere (the caller's composite).
pub(crate) fn gelu(x: &Tensor) -> Result<Option<Tensor>> {
    if !cpu_f32(x) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Gelu)?))
}

/// PReLU of `(N, C, S…)` with slopes `a` of `(C,)` or `(1,)`: `x` for `x > 0`, `a_c·x`
/// otherwise. Backward: `∂L/∂x = g` or `a_c·g`; `∂L/∂a_c = Σ g·x` over the values `x ≤ 0` of
/// channel `c` (summed in f64). One output tensor where the composite kept six.
struct Prelu;

/// The slope of flat channel block `block` (`n·C + c`) of `(N, C, S…)`.
fn slope(a: &[f32], block: usize, channels: usize) -> f32 {
    if a.len() == 1 {
        a[0]
    } else {
        a[block % channels]
    }
}

impl CustomOp2 for Prelu {
    fn name(&self) -> &'static str {
        "cwseg-prelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let dims = l1.dims();
        if dims.len() < 2 || !(a.len() == 1 || a.len() == dims[1]) {
            bail!("prelu: {} slopes for the shape {dims:?}", a.len());
        }
        let (channels, spatial) = (dims[1], dims[2..].iter().product::<usize>().max(1));
        let y = map_channel_blocks(x, spatial, channels, |c| {
            let w = slope(a, c, channels);
            move |u| if u > 0.0 { u } else { w * u }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let (channels, spatial) = (dims[1], dims[2..].iter().product::<usize>().max(1));
        let slopes = a.flatten_all()?.to_vec1::<f32>()?;
        let (dx, per_block) = with_f32(x, |xv| {
            with_f32(grad, |gv| {
                let mut dx = zeros(gv.len());
                let per_block: Vec<f64> = dx
                    .par_chunks_mut(spatial)
                    .zip(gv.par_chunks(spatial).zip(xv.par_chunks(spatial)))
                    .enumerate()
                    .map(|(block, (d, (g, u)))| {
                        let w = slope(&slopes, block, channels);
                        let mut sum = 0f64;
                        for ((o, &gi), &ui) in d.iter_mut().zip(g).zip(u) {
                            if ui > 0.0 {
                                *o = gi;
                            } else {
                                *o = w * gi;
                                sum += f64::from(gi) * f64::from(ui);
                            }
                        }
                        sum
                    })
                    .collect();
                Ok((dx, per_block))
            })
        })?;
        let mut da = vec![0f64; slopes.len()];
        for (block, sum) in per_block.iter().enumerate() {
            da[if slopes.len() == 1 {
                0
            } else {
                block % channels
            }] += sum;
        }
        let da: Vec<f32> = da.into_iter().map(|v| v as f32).collect();
        Ok((
            Some(Tensor::from_vec(dx, dims, x.device())?),
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
        ))
    }
}

/// PReLU: the fused kernel on CPU f32 (`x` of rank ≥ 2), `None` elsewhere.
pub(crate) fn prelu(x: &Tensor, a: &Tensor) -> Result<Option<Tensor>> {
    if !(cpu_f32(x) && cpu_f32(a) && x.rank() >= 2) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&a.contiguous()?, Prelu)?))
}

/// `y[n, c, s] = x[n, c, s] + b[c]` on `(N, C, S…)`; the bias gradient is the per-channel sum
/// of the output gradient (candle's `broadcast_add` sums over the other axes with a single
/// thread and an index division per value).
struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "cwseg-channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let dims = l1.dims();
        if dims.len() < 2 || dims[1] != b.len() {
            bail!("channel bias: {} values for the shape {dims:?}", b.len());
        }
        let spatial: usize = dims[2..].iter().product();
        let mut y = x.to_vec();
        shift_channels(&mut y, spatial, b);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sums = channel_sums(grad)?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(sums)))
    }
}

/// `y[n, c, s] += shift[c]` in place on the values of `(N, C, S…)`, `spatial` = |S|.
pub(crate) fn shift_channels(y: &mut [f32], spatial: usize, shift: &[f32]) {
    if spatial == 0 || shift.is_empty() {
        return;
    }
    y.par_chunks_mut(spatial)
        .enumerate()
        .for_each(|(i, channel)| {
            let v = shift[i % shift.len()];
            channel.iter_mut().for_each(|a| *a += v);
        });
}

/// Per-channel sums of `(N, C, S…)` over every other axis, `(C,)` (in f64, in parallel over
/// channels).
pub(crate) fn channel_sums(g: &Tensor) -> Result<Tensor> {
    let dims = g.dims();
    if dims.len() < 2 {
        bail!("channel sums: shape {dims:?} has no channel axis");
    }
    let (n, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    let sums = with_f32(g, |g| {
        Ok((0..c)
            .into_par_iter()
            .map(|ch| {
                let mut sum = 0f64;
                for s in 0..n {
                    sum += g[(s * c + ch) * spatial..][..spatial]
                        .iter()
                        .map(|&v| v as f64)
                        .sum::<f64>();
                }
                sum as f32
            })
            .collect::<Vec<f32>>())
    })?;
    Tensor::from_vec(sums, c, g.device())
}

/// `x + b` over the channel axis of `(N, C, S…)`, `b` of shape `(C,)`: the fused kernel on CPU
/// f32, candle's `broadcast_add` elsewhere.
pub(crate) fn add_channel_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) && cpu_f32(b) && x.rank() >= 2 {
        x.contiguous()?.apply_op2(&b.contiguous()?, ChannelBias)
    } else {
        let mut shape = vec![1; x.rank()];
        shape[1] = b.elem_count();
        x.broadcast_add(&b.reshape(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's `exp_m1` from −30 to 0, finely near 0 where `eˣ − 1` loses digits when
    /// computed as `eˣ` minus 1: within 2·10⁻⁷ of the value (a few f32 ulps).
    #[test]
    fn expm1_matches_f64() {
        let near_zero = (1..2000).map(|i| -(i as f32) * 1e-6);
        let wide = (0..=30_000).map(|i| -(i as f32) * 1e-3);
        for x in near_zero.chain(wide).chain([-1e-30, -0.0, -87.0, f32::MIN]) {
            let want = f64::from(x).exp_m1();
            let got = f64::from(expm1_non_positive(x));
            assert!(
                (got - want).abs() <= 2e-7 * want.abs().max(1e-30),
                "expm1({x}) = {got}, want {want}"
            );
        }
    }

    /// Against f64's `exp` from −86.9 to 0: within 2·10⁻⁷ of the value; NaN kept, −∞ to about
    /// 0.
    #[test]
    fn exp_matches_f64() {
        for x in (0..=86_900)
            .map(|i| -(i as f32) * 1e-3)
            .chain([-0.0, -1e-30])
        {
            let want = f64::from(x).exp();
            let got = f64::from(exp_non_positive(x));
            assert!(
                (got - want).abs() <= 2e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert!(exp_non_positive(f32::NAN).is_nan());
        assert!(exp_non_positive(f32::NEG_INFINITY) < 1e-37);
    }

    /// The ELU op keeps NaN, and takes `α (eˣ − 1)` below 0.
    #[test]
    fn elu_keeps_nan() -> Result<()> {
        let x = Tensor::new(
            &[f32::NAN, -1.0, 0.0, 2.0, f32::NEG_INFINITY],
            &candle_core::Device::Cpu,
        )?;
        let y: Vec<f32> = elu(&x, 0.5)?.expect("CPU f32").to_vec1()?;
        assert!(y[0].is_nan());
        assert!((y[1] - 0.5 * (-1f32).exp_m1()).abs() < 1e-7);
        assert_eq!(&y[2..], &[0.0, 2.0, -0.5]);
        Ok(())
    }
}
