//! Layer normalisation over the last axis on the CPU as one op: `y = γ x̂ + β` with
//! `x̂ = (x − μ)·r`, `μ` the row's mean, `r = 1/√(σ² + ε)` and `σ²` its biased variance, per
//! row of `C` values. Its node keeps `x` (and the rows' `μ`, `r`), where the composite of
//! candle operations kept five tensors of `x`'s size: the transformers' token tensors are
//! normalised twice per block.
//!
//! The backward, with `ĝ = γ ⊙ g` per row:
//! `∂x = r/C · (C ĝ − Σ ĝ − x̂ Σ(ĝ ⊙ x̂))`, `∂γ = Σ_rows g ⊙ x̂`, `∂β = Σ_rows g`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{cpu_f32, f32_slice, with_f32, zeros};

/// Rows per task when the affine gradients are summed (each task keeps its own sums of `C`).
const ROWS_PER_TASK: usize = 64;

struct LayerNorm {
    /// Each row's mean.
    mean: Vec<f32>,
    /// Each row's `1/√(σ² + ε)`.
    rstd: Vec<f32>,
    /// `C`, the normalised axis's length.
    row: usize,
    /// Whether `γ`, `β` are the layer's (else ones and zeros standing in: no gradients).
    affine: bool,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "cwseg-layer-norm"
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
        let mut y = zeros(x.len());
        y.par_chunks_mut(self.row)
            .zip(x.par_chunks(self.row))
            .enumerate()
            .for_each(|(i, (out, input))| {
                let (mean, rstd) = (self.mean[i], self.rstd[i]);
                for (((o, &v), &g), &b) in out.iter_mut().zip(input).zip(gamma).zip(beta) {
                    *o = (v - mean) * rstd * g + b;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.row;
        let gamma_v: Vec<f32> = gamma.to_vec1()?;
        let (dx, affine) = with_f32(x, |xv| {
            with_f32(grad, |gv| {
                let dx = self.input_gradient(xv, gv, &gamma_v);
                let affine = self.affine.then(|| self.affine_gradients(xv, gv));
                Ok((dx, affine))
            })
        })?;
        let device = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), device)?;
        let Some((dgamma, dbeta)) = affine else {
            return Ok((Some(dx), None, None));
        };
        Ok((
            Some(dx),
            Some(Tensor::from_vec(dgamma, c, device)?),
            Some(Tensor::from_vec(dbeta, c, device)?),
        ))
    }
}

impl LayerNorm {
    /// `∂x = r/C · (C ĝ − Σ ĝ − x̂ Σ(ĝ ⊙ x̂))` per row, `ĝ = γ ⊙ g`.
    fn input_gradient(&self, xv: &[f32], gv: &[f32], gamma: &[f32]) -> Vec<f32> {
        let c = self.row;
        let mut dx = zeros(xv.len());
        dx.par_chunks_mut(c)
            .zip(xv.par_chunks(c).zip(gv.par_chunks(c)))
            .enumerate()
            .for_each(|(i, (out, (x, g)))| {
                let (mean, rstd) = (self.mean[i], self.rstd[i]);
                let (mut sum, mut dot) = (0f32, 0f32);
                for ((&v, &dy), &w) in x.iter().zip(g).zip(gamma) {
                    let gh = dy * w;
                    sum += gh;
                    dot += gh * (v - mean) * rstd;
                }
                let k = rstd / c as f32;
                for (((o, &v), &dy), &w) in out.iter_mut().zip(x).zip(g).zip(gamma) {
                    let xhat = (v - mean) * rstd;
                    *o = k * (c as f32 * dy * w - sum - xhat * dot);
                }
            });
        dx
    }

    /// `(Σ_rows g ⊙ x̂, Σ_rows g)`, summed in f64 per block of rows, then over the blocks.
    fn affine_gradients(&self, xv: &[f32], gv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let c = self.row;
        let block = ROWS_PER_TASK * c;
        let (dgamma, dbeta) = xv
            .par_chunks(block)
            .zip(gv.par_chunks(block))
            .enumerate()
            .map(|(b, (x, g))| {
                let (mut dg, mut db) = (vec![0f64; c], vec![0f64; c]);
                for (r, (xr, gr)) in x.chunks(c).zip(g.chunks(c)).enumerate() {
                    let i = b * ROWS_PER_TASK + r;
                    let (mean, rstd) = (self.mean[i], self.rstd[i]);
                    for (j, (&v, &dy)) in xr.iter().zip(gr).enumerate() {
                        dg[j] += f64::from(dy * (v - mean) * rstd);
                        db[j] += f64::from(dy);
                    }
                }
                (dg, db)
            })
            .reduce(
                || (vec![0f64; c], vec![0f64; c]),
                |(mut a, mut b), (x, y)| {
                    a.iter_mut().zip(&x).for_each(|(s, v)| *s += v);
                    b.iter_mut().zip(&y).for_each(|(s, v)| *s += v);
                    (a, b)
                },
            );
        let narrow = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect();
        (narrow(dgamma), narrow(dbeta))
    }
}

/// Layer normalisation of a CPU f32 tensor over its last axis with `γ`, `β` of that axis's
/// length (ones and zeros when absent); `None` elsewhere (the caller's composite).
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Option<Tensor>> {
    let row = x.dims().last().copied().unwrap_or(0);
    let fits = |t: &Tensor| cpu_f32(t) && t.dims() == [row];
    let affine_f32 = weight.is_none_or(fits) && bias.is_none_or(fits);
    if !cpu_f32(x) || !affine_f32 || row == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (mean, rstd) = with_f32(&x, |xv| {
        Ok(xv
            .par_chunks(row)
            .map(|r| {
                let mean = r.iter().map(|&v| f64::from(v)).sum::<f64>() / row as f64;
                let var = r
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / row as f64;
                (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
            })
            .unzip::<f32, f32, Vec<f32>, Vec<f32>>())
    })?;
    let device = x.device();
    let gamma = match weight {
        Some(w) => w.contiguous()?,
        None => Tensor::ones(row, candle_core::DType::F32, device)?,
    };
    let beta = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(row, candle_core::DType::F32, device)?,
    };
    let op = LayerNorm {
        mean,
        rstd,
        row,
        affine: weight.is_some() || bias.is_some(),
    };
    Ok(Some(x.apply_op3(&gamma, &beta, op)?))
}
