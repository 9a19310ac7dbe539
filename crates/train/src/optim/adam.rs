//! Adam's update: on the CPU in f32 as three in-place passes (first moment, second moment,
//! parameter); elsewhere as a composite of candle operations, which allocates a tensor per
//! operation (thirteen passes over every parameter: 5.6 s per step for UNETR's 93 M parameters
//! on a 2-core EPYC, against 0.3 s in place; BENCHMARKS.md). The in-place passes evaluate the
//! composite's operations in the same order and in f32 (candle's `affine` is `x·mul + add`
//! with both cast to f32), so both paths give the same bits (tested); both are checked
//! against PyTorch's `Adam` and `AdamW` in `tests/adam_pytorch.rs`.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, bail};
use rayon::prelude::*;

/// Values per parallel block.
const BLOCK: usize = 1 << 14;

fn values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("fused Adam: expected contiguous f32 tensors"),
    }
}

fn values_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("fused Adam: expected contiguous f32 tensors"),
    }
}

/// `m ← β·m + (1 − β)·g`, or with `g²` for the second moment.
struct Moment {
    beta: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "cwseg-adam-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        let (m, g) = (values_mut(dst, dst_l)?, values(g, g_l)?);
        if m.len() != g.len() {
            bail!(
                "fused Adam: moment of {} values, gradient of {}",
                m.len(),
                g.len()
            );
        }
        let (keep, take) = (self.beta as f32, (1.0 - self.beta) as f32);
        let square = self.square;
        m.par_chunks_mut(BLOCK)
            .zip(g.par_chunks(BLOCK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = if square { g * g } else { g };
                    *m = (*m * keep + 0.0) + (g * take + 0.0);
                }
            });
        Ok(())
    }
}

/// `θ ← θ·decay − lr · (m·c₁) / (√(v·c₂) + ε)` with the bias corrections
/// `c₁ = 1 / (1 − β₁ᵗ)`, `c₂ = 1 / (1 − β₂ᵗ)` and AdamW's `decay = 1 − lr·λ` (1 for Adam).
struct Update {
    lr: f64,
    correction: [f64; 2],
    eps: f64,
    decay: Option<f64>,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "cwseg-adam-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<()> {
        let (theta, m, v) = (values_mut(dst, dst_l)?, values(m, m_l)?, values(v, v_l)?);
        if m.len() != theta.len() || v.len() != theta.len() {
            bail!(
                "fused Adam: moments of {} and {} values for {}",
                m.len(),
                v.len(),
                theta.len()
            );
        }
        let (c1, c2) = (self.correction[0] as f32, self.correction[1] as f32);
        let (lr, eps) = (self.lr as f32, self.eps as f32);
        let decay = self.decay.map(|d| d as f32);
        theta
            .par_chunks_mut(BLOCK)
            .zip(m.par_chunks(BLOCK).zip(v.par_chunks(BLOCK)))
            .for_each(|(theta, (m, v))| {
                for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
                    let update = (m * c1 + 0.0) / ((v * c2 + 0.0).sqrt() * 1.0 + eps);
                    let next = match decay {
                        Some(d) => *t * d + 0.0,
                        None => *t,
                    };
                    *t = next - (update * lr + 0.0);
                }
            });
        Ok(())
    }
}

/// Adam's settings for one step.
pub(super) struct AdamStep {
    pub betas: [f64; 2],
    pub lr: f64,
    pub eps: f64,
    /// AdamW's decoupled decay `λ` (None for Adam, whose L2 term is already in `g`).
    pub decoupled_decay: Option<f64>,
    /// The step number, from 1.
    pub t: i32,
}

/// Whether [`adam_in_place`] applies: contiguous f32 tensors on the CPU.
pub(super) fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// One Adam step in place on `theta` and its moments `m`, `v` (zeros before the first step).
pub(super) fn adam_in_place(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &AdamStep,
) -> Result<()> {
    m.inplace_op2(
        g,
        &Moment {
            beta: s.betas[0],
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            beta: s.betas[1],
            square: true,
        },
    )?;
    let update = Update {
        lr: s.lr,
        correction: [
            1.0 / (1.0 - s.betas[0].powi(s.t)),
            1.0 / (1.0 - s.betas[1].powi(s.t)),
        ],
        eps: s.eps,
        decay: s.decoupled_decay.map(|wd| 1.0 - s.lr * wd),
    };
    theta.inplace_op3(m, v, &update)
}

/// One Adam step from candle operations (any device and dtype): `(θ', m', v')`, with
/// `m`, `v` `None` before the first step.
pub(super) fn adam_composite(
    theta: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    s: &AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let [b1, b2] = s.betas;
    let m = match m {
        Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
        None => (g * (1.0 - b1))?,
    };
    let v = match v {
        Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
        None => (g.sqr()? * (1.0 - b2))?,
    };
    let m_hat = (&m / (1.0 - b1.powi(s.t)))?;
    let v_hat = (&v / (1.0 - b2.powi(s.t)))?;
    let update = (m_hat / (v_hat.sqrt()? + s.eps)?)?;
    let mut next = theta.clone();
    if let Some(wd) = s.decoupled_decay {
        next = (next * (1.0 - s.lr * wd))?;
    }
    Ok(((next - (update * s.lr)?)?, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32 values")
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// Three steps of both paths from the same random parameters and gradients, Adam and
    /// AdamW: parameters and moments equal to the bit.
    #[test]
    fn in_place_steps_equal_the_composite() {
        let dev = Device::Cpu;
        for decoupled_decay in [None, Some(0.01)] {
            let theta0 = Tensor::randn(0f32, 1.0, (7, 300), &dev).expect("theta");
            let fused = theta0.copy().expect("copy");
            let (m, v) = (
                theta0.zeros_like().expect("m"),
                theta0.zeros_like().expect("v"),
            );
            let (mut theta, mut mc, mut vc) = (theta0.clone(), None, None);
            for t in 1..=3 {
                let g = Tensor::randn(0f32, 0.1, (7, 300), &dev).expect("gradient");
                let s = AdamStep {
                    betas: [0.9, 0.999],
                    lr: 3e-4,
                    eps: 1e-8,
                    decoupled_decay,
                    t,
                };
                adam_in_place(&fused, &g, &m, &v, &s).expect("in place");
                let (next, m2, v2) =
                    adam_composite(&theta, &g, mc.as_ref(), vc.as_ref(), &s).expect("composite");
                (theta, mc, vc) = (next, Some(m2), Some(v2));
                assert_eq!(bits(&fused), bits(&theta), "parameters, step {t}");
                assert_eq!(bits(&m), bits(mc.as_ref().expect("m")), "first moment");
                assert_eq!(bits(&v), bits(vc.as_ref().expect("v")), "second moment");
            }
            assert_ne!(bits(&fused), bits(&theta0), "the parameters moved");
        }
    }
}
