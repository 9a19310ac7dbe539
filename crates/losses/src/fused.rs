//! The CPU fast path: the two reductions every loss of the zoo but Focal and boundary is
//! built from, fused into single parallel passes over the logits (softmax per voxel, never
//! materialised), with their backward passes. Other devices use [`composite`] versions made of
//! candle operations; both agree to rounding (tests compare them).
//!
//! * [`class_stats`] `(N, K, 6)`: per sample and class `I = Σ p t`, `P = Σ p`, `P2 = Σ p²`,
//!   `G = Σ t`, `I_E = Σ E p t`, `G_E = Σ E t` over the voxels, with `E` an optional per-voxel
//!   map (the edge map of SDL).
//! * [`weighted_nll`] `(N,)`: per sample `Σ_v w_v ℓ_v`, `ℓ_v = −log p_{v, y_v}`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Number of statistics per sample and class.
pub(crate) const STATS: usize = 6;
/// Index of each statistic.
pub(crate) mod stat {
    pub const I: usize = 0;
    pub const P: usize = 1;
    pub const P2: usize = 2;
    pub const G: usize = 3;
    pub const IE: usize = 4;
    pub const GE: usize = 5;
}

/// Voxels per task.
const CHUNK: usize = 1024;

/// The constants of one reduction: labels `(N·V)` and an optional per-voxel map `(N·V)`.
#[derive(Clone)]
struct Problem {
    labels: Arc<Vec<u32>>,
    map: Option<Arc<Vec<f64>>>,
    samples: usize,
    classes: usize,
    voxels: usize,
}

impl Problem {
    fn new(labels: &Tensor, map: Option<&Tensor>, classes: usize) -> Result<Self> {
        let (samples, ..) = labels.dims4()?;
        let voxels = labels.elem_count() / samples.max(1);
        let labels = Arc::new(labels.flatten_all()?.to_vec1::<u32>()?);
        let map = match map {
            Some(m) => Some(Arc::new(
                m.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            )),
            None => None,
        };
        Ok(Problem {
            labels,
            map,
            samples,
            classes,
            voxels,
        })
    }

    fn chunks(&self) -> usize {
        self.voxels.div_ceil(CHUNK)
    }

    /// Softmax of voxels `v0..v0 + len` of sample `n`: `probs[k·len + j]`.
    fn softmax<T: Real>(
        &self,
        z: &[T],
        n: usize,
        v0: usize,
        len: usize,
        probs: &mut [f64],
        sums: &mut [f64],
    ) {
        let (k, v) = (self.classes, self.voxels);
        let base = n * k * v + v0;
        let max = &mut sums[..len];
        max.fill(f64::NEG_INFINITY);
        for c in 0..k {
            for (m, x) in max.iter_mut().zip(&z[base + c * v..base + c * v + len]) {
                *m = m.max(x.to_f64());
            }
        }
        for c in 0..k {
            let row = &mut probs[c * len..(c + 1) * len];
            for ((p, x), m) in row
                .iter_mut()
                .zip(&z[base + c * v..base + c * v + len])
                .zip(max.iter())
            {
                *p = (x.to_f64() - m).exp();
            }
        }
        let total = &mut sums[..len];
        total.fill(0.0);
        for c in 0..k {
            for (t, p) in total.iter_mut().zip(&probs[c * len..(c + 1) * len]) {
                *t += p;
            }
        }
        for c in 0..k {
            for (p, t) in probs[c * len..(c + 1) * len].iter_mut().zip(total.iter()) {
                *p /= t;
            }
        }
    }

    /// Runs `task(n, v0, len, out_rows)` for every chunk in parallel, giving each the K rows of
    /// its part of an `(N, K, V)` output.
    fn per_chunk_output<T: Real>(
        &self,
        task: impl Fn(usize, usize, usize, Vec<&mut [T]>) + Sync,
    ) -> Vec<T> {
        let (k, v) = (self.classes, self.voxels);
        let mut out = vec![T::from_f64(0.0); self.samples * k * v];
        let mut tasks: Vec<(usize, usize, Vec<&mut [T]>)> = Vec::new();
        for (n, sample) in out.chunks_mut(k * v.max(1)).enumerate() {
            let first = tasks.len();
            for row in sample.chunks_mut(v.max(1)) {
                for (c, piece) in row.chunks_mut(CHUNK).enumerate() {
                    if first + c == tasks.len() {
                        tasks.push((n, c * CHUNK, Vec::with_capacity(k)));
                    }
                    tasks[first + c].2.push(piece);
                }
            }
        }
        tasks.into_par_iter().for_each(|(n, v0, rows)| {
            let len = rows.first().map_or(0, |r| r.len());
            task(n, v0, len, rows)
        });
        out
    }
}

/// f32 or f64 logits.
trait Real: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn storage(values: Vec<Self>) -> CpuStorage;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(values)
    }
}

fn contiguous<'a, T>(
    values: &'a [T],
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{op}: the logits must be contiguous"),
    }
}

macro_rules! dispatch {
    ($storage:expr, $layout:expr, $op:expr, |$z:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(values) => {
                let $z = contiguous(values, $layout, $op)?;
                $body
            }
            CpuStorage::F64(values) => {
                let $z = contiguous(values, $layout, $op)?;
                $body
            }
            _ => candle_core::bail!("{}: logits must be f32 or f64", $op),
        }
    };
}

/// Per-sample, per-class statistics `(N, K, 6)` of logits `(N, K, D, H, W)` against `u32`
/// labels, with the optional map `E` `(N, D, H, W)`; differentiable w.r.t. the logits.
pub(crate) fn class_stats(
    logits: &Tensor,
    labels: &Tensor,
    map: Option<&Tensor>,
) -> Result<Tensor> {
    let problem = Problem::new(labels, map, logits.dim(1)?)?;
    Ok(logits.contiguous()?.apply_op1(ClassStats(problem))?)
}

struct ClassStats(Problem);

impl ClassStats {
    fn forward<T: Real>(&self, z: &[T]) -> Vec<f64> {
        let p = &self.0;
        let (k, v) = (p.classes, p.voxels);
        let chunks = p.chunks();
        (0..p.samples * chunks)
            .into_par_iter()
            .fold(
                || {
                    (
                        vec![0f64; p.samples * k * STATS],
                        vec![0f64; k * CHUNK],
                        vec![0f64; CHUNK],
                    )
                },
                |(mut acc, mut probs, mut scratch), task| {
                    let (n, v0) = (task / chunks, (task % chunks) * CHUNK);
                    let len = CHUNK.min(v - v0);
                    p.softmax(z, n, v0, len, &mut probs, &mut scratch);
                    let row = &mut acc[n * k * STATS..(n + 1) * k * STATS];
                    for c in 0..k {
                        let (mut sum, mut sq) = (0.0, 0.0);
                        for &q in &probs[c * len..(c + 1) * len] {
                            sum += q;
                            sq += q * q;
                        }
                        row[c * STATS + stat::P] += sum;
                        row[c * STATS + stat::P2] += sq;
                    }
                    for j in 0..len {
                        let voxel = n * v + v0 + j;
                        let c = p.labels[voxel] as usize;
                        let q = probs[c * len + j];
                        let e = p.map.as_ref().map_or(0.0, |m| m[voxel]);
                        let s = &mut row[c * STATS..(c + 1) * STATS];
                        s[stat::I] += q;
                        s[stat::G] += 1.0;
                        s[stat::IE] += e * q;
                        s[stat::GE] += e;
                    }
                    (acc, probs, scratch)
                },
            )
            .map(|(acc, _, _)| acc)
            .reduce(
                || vec![0f64; p.samples * k * STATS],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    }
}

impl CustomOp1 for ClassStats {
    fn name(&self) -> &'static str {
        "cwseg-class-stats"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.0.samples, self.0.classes, STATS));
        dispatch!(storage, layout, "class statistics", |z| {
            let stats = self.forward(z);
            Ok((storage_like(storage, stats), shape))
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?.to_dtype(DType::F64)?;
        Ok(Some(arg.apply_op2_no_bwd(
            &grad,
            &ClassStatsBackward(self.0.clone()),
        )?))
    }
}

fn storage_like(like: &CpuStorage, values: Vec<f64>) -> CpuStorage {
    match like {
        CpuStorage::F32(_) => CpuStorage::F32(values.into_iter().map(|x| x as f32).collect()),
        _ => CpuStorage::F64(values),
    }
}

/// `∂L/∂z` from `∂L/∂stats`: `∂L/∂p_k = gP + 2 gP2 p_k + [k = y](gI + E gIE)`, then through
/// the softmax, `∂L/∂z_k = p_k (∂L/∂p_k − Σ_j p_j ∂L/∂p_j)`.
struct ClassStatsBackward(Problem);

impl ClassStatsBackward {
    fn backward<T: Real>(&self, z: &[T], g: &[f64]) -> Vec<T> {
        let p = &self.0;
        let (k, v) = (p.classes, p.voxels);
        p.per_chunk_output(|n, v0, len, mut rows| {
            let mut probs = vec![0f64; k * len];
            let mut scratch = vec![0f64; len];
            p.softmax(z, n, v0, len, &mut probs, &mut scratch);
            let g = &g[n * k * STATS..(n + 1) * k * STATS];
            let mut dp = vec![0f64; k];
            for j in 0..len {
                let voxel = n * v + v0 + j;
                let label = p.labels[voxel] as usize;
                let e = p.map.as_ref().map_or(0.0, |m| m[voxel]);
                let mut dot = 0.0;
                for c in 0..k {
                    let q = probs[c * len + j];
                    let s = &g[c * STATS..(c + 1) * STATS];
                    let mut d = s[stat::P] + 2.0 * s[stat::P2] * q;
                    if c == label {
                        d += s[stat::I] + e * s[stat::IE];
                    }
                    dp[c] = d;
                    dot += q * d;
                }
                for c in 0..k {
                    let q = probs[c * len + j];
                    rows[c][j] = T::from_f64(q * (dp[c] - dot));
                }
            }
        })
    }
}

impl CustomOp2 for ClassStatsBackward {
    fn name(&self) -> &'static str {
        "cwseg-class-stats-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = match s2 {
            CpuStorage::F64(g) => contiguous(g, l2, "class statistics backward")?,
            _ => candle_core::bail!("class statistics backward: gradient must be f64"),
        };
        let shape = l1.shape().clone();
        dispatch!(s1, l1, "class statistics backward", |z| {
            Ok((Real::storage(self.backward(z, g)), shape))
        })
    }
}

/// Per-sample `Σ_v w_v ℓ_v` `(N,)` with `w` `(N, D, H, W)`; differentiable w.r.t. the logits.
pub(crate) fn weighted_nll(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let problem = Problem::new(labels, Some(weights), logits.dim(1)?)?;
    Ok(logits.contiguous()?.apply_op1(WeightedNll(problem))?)
}

struct WeightedNll(Problem);

impl WeightedNll {
    fn forward<T: Real>(&self, z: &[T]) -> Vec<f64> {
        let p = &self.0;
        let (k, v) = (p.classes, p.voxels);
        let chunks = p.chunks();
        let weights = p.map.as_ref().expect("weights are given");
        (0..p.samples * chunks)
            .into_par_iter()
            .fold(
                || vec![0f64; p.samples],
                |mut acc, task| {
                    let (n, v0) = (task / chunks, (task % chunks) * CHUNK);
                    let len = CHUNK.min(v - v0);
                    let base = n * k * v + v0;
                    for j in 0..len {
                        let voxel = n * v + v0 + j;
                        let w = weights[voxel];
                        if w == 0.0 {
                            continue;
                        }
                        let mut max = f64::NEG_INFINITY;
                        for c in 0..k {
                            max = max.max(z[base + c * v + j].to_f64());
                        }
                        let mut sum = 0.0;
                        for c in 0..k {
                            sum += (z[base + c * v + j].to_f64() - max).exp();
                        }
                        let label = p.labels[voxel] as usize;
                        let logp = z[base + label * v + j].to_f64() - max - sum.ln();
                        acc[n] -= w * logp;
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f64; p.samples],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    }
}

impl CustomOp1 for WeightedNll {
    fn name(&self) -> &'static str {
        "cwseg-weighted-nll"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from(self.0.samples);
        dispatch!(storage, layout, "weighted NLL", |z| {
            Ok((storage_like(storage, self.forward(z)), shape))
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?.to_dtype(DType::F64)?;
        Ok(Some(arg.apply_op2_no_bwd(
            &grad,
            &WeightedNllBackward(self.0.clone()),
        )?))
    }
}

/// `∂L/∂z_k = g_n w_v (p_k − [k = y_v])`.
struct WeightedNllBackward(Problem);

impl WeightedNllBackward {
    fn backward<T: Real>(&self, z: &[T], g: &[f64]) -> Vec<T> {
        let p = &self.0;
        let (k, v) = (p.classes, p.voxels);
        let weights = p.map.as_ref().expect("weights are given");
        p.per_chunk_output(|n, v0, len, mut rows| {
            let mut probs = vec![0f64; k * len];
            let mut scratch = vec![0f64; len];
            p.softmax(z, n, v0, len, &mut probs, &mut scratch);
            for j in 0..len {
                let voxel = n * v + v0 + j;
                let scale = g[n] * weights[voxel];
                let label = p.labels[voxel] as usize;
                for c in 0..k {
                    let t = if c == label { 1.0 } else { 0.0 };
                    rows[c][j] = T::from_f64(scale * (probs[c * len + j] - t));
                }
            }
        })
    }
}

impl CustomOp2 for WeightedNllBackward {
    fn name(&self) -> &'static str {
        "cwseg-weighted-nll-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = match s2 {
            CpuStorage::F64(g) => contiguous(g, l2, "weighted NLL backward")?,
            _ => candle_core::bail!("weighted NLL backward: gradient must be f64"),
        };
        let shape = l1.shape().clone();
        dispatch!(s1, l1, "weighted NLL backward", |z| {
            Ok((Real::storage(self.backward(z, g)), shape))
        })
    }
}

/// The same reductions from candle operations, for every device.
pub(crate) mod composite {
    use candle_core::{D, Tensor};

    use super::stat;
    use crate::Result;
    use crate::target::one_hot;

    fn sums(x: &Tensor) -> Result<Tensor> {
        Ok(x.flatten_from(2)?.sum(D::Minus1)?)
    }

    fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        let max = logits.max_keepdim(1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let logsum = shifted.exp()?.sum_keepdim(1)?.log()?;
        Ok(shifted.broadcast_sub(&logsum)?)
    }

    /// See [`super::class_stats`].
    pub fn class_stats(logits: &Tensor, labels: &Tensor, map: Option<&Tensor>) -> Result<Tensor> {
        let p = log_softmax(logits)?.exp()?;
        let t = one_hot(labels, logits.dim(1)?, logits.dtype())?;
        let pt = (&p * &t)?;
        let zeros = || -> Result<Tensor> { Ok(sums(&t)?.zeros_like()?) };
        let (ie, ge) = match map {
            Some(e) => {
                let e = e.unsqueeze(1)?;
                (sums(&pt.broadcast_mul(&e)?)?, sums(&t.broadcast_mul(&e)?)?)
            }
            None => (zeros()?, zeros()?),
        };
        let mut parts = vec![Tensor::new(0f32, logits.device())?; super::STATS];
        parts[stat::I] = sums(&pt)?;
        parts[stat::P] = sums(&p)?;
        parts[stat::P2] = sums(&p.sqr()?)?;
        parts[stat::G] = sums(&t)?;
        parts[stat::IE] = ie;
        parts[stat::GE] = ge;
        Ok(Tensor::stack(&parts, 2)?)
    }

    /// See [`super::weighted_nll`].
    pub fn weighted_nll(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let t = one_hot(labels, logits.dim(1)?, logits.dtype())?;
        let nll = (log_softmax(logits)? * t)?.sum(1)?.neg()?;
        Ok((nll * weights)?.flatten_from(1)?.sum(D::Minus1)?)
    }
}
