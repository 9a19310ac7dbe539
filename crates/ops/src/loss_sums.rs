//! The CPU fast path: every loss of the zoo but Focal and boundary is a function of a few
//! per-sample, per-class sums, fused here into one parallel pass over the logits (softmax per
//! voxel, never materialised), with its backward pass. Other devices use `cwseg-losses`'
//! composite version made of candle operations; both agree to rounding (tests compare them).
//!
//! `reduce` gives `(N, K, 7)`: per sample and class `I = Σ p t`, `P = Σ p`, `P2 = Σ p²`,
//! `G = Σ t`, `I_E = Σ E p t`, `G_E = Σ E t` and `NLL = Σ_{v: y_v = k} w_v ℓ_v`
//! (`ℓ_v = −log p_{v,y_v}`), with `E` and `w` optional per-voxel maps (0 when absent).

use std::ops::{Add, Div, Mul, Sub};
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use candle_core::Result;

/// Number of statistics per sample and class.
pub const STATS: usize = 7;
/// Index of each statistic.
pub mod stat {
    /// `I = Σ p t`, the overlap.
    pub const I: usize = 0;
    /// `P = Σ p`.
    pub const P: usize = 1;
    /// `P2 = Σ p²`.
    pub const P2: usize = 2;
    /// `G = Σ t`.
    pub const G: usize = 3;
    /// `I_E = Σ E p t`, the overlap on the edge map.
    pub const IE: usize = 4;
    /// `G_E = Σ E t`.
    pub const GE: usize = 5;
    /// `NLL = Σ_{v: y_v = k} w_v ℓ_v`.
    pub const NLL: usize = 6;
}

/// Voxels per task.
const CHUNK: usize = 1024;

/// The constants of one reduction: labels `(N·V)` and the optional maps `E` and `w` `(N·V)`.
#[derive(Clone)]
struct Problem {
    labels: Arc<Vec<u32>>,
    edges: Option<Arc<Vec<f64>>>,
    weights: Option<Arc<Vec<f64>>>,
    samples: usize,
    classes: usize,
    voxels: usize,
}

fn host(map: Option<&Tensor>) -> Result<Option<Arc<Vec<f64>>>> {
    Ok(match map {
        Some(m) => Some(Arc::new(
            m.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        )),
        None => None,
    })
}

impl Problem {
    fn new(
        labels: &Tensor,
        edges: Option<&Tensor>,
        weights: Option<&Tensor>,
        classes: usize,
    ) -> Result<Self> {
        let (samples, ..) = labels.dims4()?;
        let voxels = labels.elem_count() / samples.max(1);
        Ok(Problem {
            labels: Arc::new(labels.flatten_all()?.to_vec1::<u32>()?),
            edges: host(edges)?,
            weights: host(weights)?,
            samples,
            classes,
            voxels,
        })
    }

    fn chunks(&self) -> usize {
        self.voxels.div_ceil(CHUNK)
    }

    /// Softmax of voxels `v0..v0 + len` of sample `n` into `probs[k·len + j]`; `logsum[j]`
    /// receives `max + log Σ exp(z − max)`, so that `log p_k = z_k − logsum`.
    fn softmax<T: Real>(
        &self,
        z: &[T],
        n: usize,
        v0: usize,
        len: usize,
        probs: &mut [T],
        logsum: &mut [T],
    ) {
        let (k, v) = (self.classes, self.voxels);
        let base = n * k * v + v0;
        let row = |c: usize| &z[base + c * v..base + c * v + len];
        let max = &mut logsum[..len];
        max.copy_from_slice(row(0));
        for c in 1..k {
            for (m, &x) in max.iter_mut().zip(row(c)) {
                *m = m.max_(x);
            }
        }
        for c in 0..k {
            for ((p, &x), &m) in probs[c * len..(c + 1) * len]
                .iter_mut()
                .zip(row(c))
                .zip(max.iter())
            {
                *p = (x - m).exp_();
            }
        }
        let mut total = vec![T::ZERO; len];
        for c in 0..k {
            for (t, &p) in total.iter_mut().zip(&probs[c * len..(c + 1) * len]) {
                *t = *t + p;
            }
        }
        for c in 0..k {
            for (p, &t) in probs[c * len..(c + 1) * len].iter_mut().zip(&total) {
                *p = *p / t;
            }
        }
        for (m, t) in max.iter_mut().zip(total) {
            *m = *m + t.ln_();
        }
    }

    /// Runs `task(n, v0, rows)` for every chunk in parallel, giving each the K rows of its part
    /// of an `(N, K, V)` output.
    fn per_chunk_output<T: Real>(
        &self,
        task: impl Fn(usize, usize, Vec<&mut [T]>) + Sync,
    ) -> Vec<T> {
        let (k, v) = (self.classes, self.voxels);
        let mut out = vec![T::ZERO; self.samples * k * v];
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
        tasks
            .into_par_iter()
            .for_each(|(n, v0, rows)| task(n, v0, rows));
        out
    }

    fn forward<T: Real>(&self, z: &[T]) -> Vec<f64> {
        let (k, v) = (self.classes, self.voxels);
        let chunks = self.chunks();
        let width = self.samples * k * STATS;
        // One row of partial sums per task, added in task order afterwards: the result does not
        // depend on how rayon schedules the tasks (runs are reproducible bit for bit).
        let partials: Vec<Vec<f64>> = (0..self.samples * chunks)
            .into_par_iter()
            .map_init(
                || (vec![T::ZERO; k * CHUNK], vec![T::ZERO; CHUNK]),
                |(probs, logsum), task| {
                    let (n, v0) = (task / chunks, (task % chunks) * CHUNK);
                    let len = CHUNK.min(v - v0);
                    self.softmax(z, n, v0, len, probs, logsum);
                    let mut row = vec![0f64; k * STATS];
                    for c in 0..k {
                        let (mut sum, mut sq) = (T::ZERO, T::ZERO);
                        for &q in &probs[c * len..(c + 1) * len] {
                            sum = sum + q;
                            sq = sq + q * q;
                        }
                        row[c * STATS + stat::P] += sum.to_f64();
                        row[c * STATS + stat::P2] += sq.to_f64();
                    }
                    let base = n * k * v + v0;
                    for j in 0..len {
                        let voxel = n * v + v0 + j;
                        let c = self.labels[voxel] as usize;
                        let q = probs[c * len + j].to_f64();
                        let s = &mut row[c * STATS..(c + 1) * STATS];
                        s[stat::I] += q;
                        s[stat::G] += 1.0;
                        if let Some(e) = &self.edges {
                            s[stat::IE] += e[voxel] * q;
                            s[stat::GE] += e[voxel];
                        }
                        if let Some(w) = &self.weights {
                            let logp = (z[base + c * v + j] - logsum[j]).to_f64();
                            s[stat::NLL] -= w[voxel] * logp;
                        }
                    }
                    row
                },
            )
            .collect();
        let mut acc = vec![0f64; width];
        for (task, row) in partials.iter().enumerate() {
            let n = task / chunks;
            acc[n * k * STATS..(n + 1) * k * STATS]
                .iter_mut()
                .zip(row)
                .for_each(|(a, b)| *a += b);
        }
        acc
    }

    /// `∂L/∂z` from `∂L/∂stats`: `∂L/∂p_c = gP + 2 gP2 p_c + [c = y](gI + E gIE)` through the
    /// softmax, `p_c (∂L/∂p_c − Σ_j p_j ∂L/∂p_j)`, plus `gNLL_y w (p_c − [c = y])`.
    fn backward<T: Real>(&self, z: &[T], g: &[f64]) -> Vec<T> {
        let (k, v) = (self.classes, self.voxels);
        self.per_chunk_output(|n, v0, mut rows| {
            let len = rows.first().map_or(0, |r| r.len());
            let mut probs = vec![T::ZERO; k * len];
            let mut logsum = vec![T::ZERO; len];
            self.softmax(z, n, v0, len, &mut probs, &mut logsum);
            let g = &g[n * k * STATS..(n + 1) * k * STATS];
            let gp: Vec<T> = (0..k)
                .map(|c| T::from_f64(g[c * STATS + stat::P]))
                .collect();
            let gp2: Vec<T> = (0..k)
                .map(|c| T::from_f64(2.0 * g[c * STATS + stat::P2]))
                .collect();
            let mut dot = vec![T::ZERO; len];
            // Dense part: gP + 2 gP2 p, for every class.
            for c in 0..k {
                let (a, b) = (gp[c], gp2[c]);
                for ((o, &q), d) in rows[c]
                    .iter_mut()
                    .zip(&probs[c * len..(c + 1) * len])
                    .zip(dot.iter_mut())
                {
                    let dp = a + b * q;
                    *o = dp;
                    *d = *d + q * dp;
                }
            }
            // The label's class: the I, I_E terms (into ∂L/∂p) and the NLL term.
            let mut nll_scale = vec![0f64; len];
            for j in 0..len {
                let voxel = n * v + v0 + j;
                let c = self.labels[voxel] as usize;
                let s = &g[c * STATS..(c + 1) * STATS];
                let e = self.edges.as_ref().map_or(0.0, |e| e[voxel]);
                let extra = T::from_f64(s[stat::I] + e * s[stat::IE]);
                rows[c][j] = rows[c][j] + extra;
                dot[j] = dot[j] + probs[c * len + j] * extra;
                nll_scale[j] = self
                    .weights
                    .as_ref()
                    .map_or(0.0, |w| w[voxel] * s[stat::NLL]);
            }
            for c in 0..k {
                for (j, (o, &q)) in rows[c]
                    .iter_mut()
                    .zip(&probs[c * len..(c + 1) * len])
                    .enumerate()
                {
                    *o = q * (*o - dot[j]) + T::from_f64(nll_scale[j]) * q;
                }
            }
            for j in 0..len {
                if nll_scale[j] != 0.0 {
                    let c = self.labels[n * v + v0 + j] as usize;
                    rows[c][j] = rows[c][j] - T::from_f64(nll_scale[j]);
                }
            }
        })
    }
}

/// f32 or f64 logits.
trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    const ZERO: Self;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn exp_(self) -> Self;
    fn ln_(self) -> Self;
    fn max_(self, other: Self) -> Self;
    fn storage(values: Vec<Self>) -> CpuStorage;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    /// `exp` for `x ≤ 0` to within 2 ulp (Cephes `expf`): range reduction by `ln 2` with a
    /// rounding trick SSE2 can vectorise, a degree-5 polynomial, the exponent set by bits.
    #[inline]
    fn exp_(self) -> Self {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³
        let x = self.clamp(-87.0, 88.0);
        let n = (x * LOG2E + ROUND) - ROUND;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        y * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
    fn ln_(self) -> Self {
        self.ln()
    }
    #[inline]
    fn max_(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn exp_(self) -> Self {
        self.exp()
    }
    fn ln_(self) -> Self {
        self.ln()
    }
    #[inline]
    fn max_(self, other: Self) -> Self {
        if other > self { other } else { self }
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

/// The `(N, K, 7)` reductions of logits `(N, K, D, H, W)` against `u32` labels with the
/// optional edge map `E` and NLL weights `w` `(N, D, H, W)`; differentiable w.r.t. the logits.
pub fn reduce(
    logits: &Tensor,
    labels: &Tensor,
    edges: Option<&Tensor>,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let problem = Problem::new(labels, edges, weights, logits.dim(1)?)?;
    logits.contiguous()?.apply_op1(Reduce(problem))
}

struct Reduce(Problem);

impl CustomOp1 for Reduce {
    fn name(&self) -> &'static str {
        "cwseg-loss-reductions"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.0.samples, self.0.classes, STATS));
        let op = "loss reductions";
        match storage {
            CpuStorage::F32(z) => {
                let stats = self.0.forward(contiguous(z, layout, op)?);
                Ok((
                    CpuStorage::F32(stats.into_iter().map(|x| x as f32).collect()),
                    shape,
                ))
            }
            CpuStorage::F64(z) => Ok((
                CpuStorage::F64(self.0.forward(contiguous(z, layout, op)?)),
                shape,
            )),
            _ => candle_core::bail!("{op}: logits must be f32 or f64"),
        }
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
            &ReduceBackward(self.0.clone()),
        )?))
    }
}

struct ReduceBackward(Problem);

impl CustomOp2 for ReduceBackward {
    fn name(&self) -> &'static str {
        "cwseg-loss-reductions-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "loss reductions backward";
        let g = match s2 {
            CpuStorage::F64(g) => contiguous(g, l2, op)?,
            _ => candle_core::bail!("{op}: gradient must be f64"),
        };
        let shape = l1.shape().clone();
        match s1 {
            CpuStorage::F32(z) => Ok((
                Real::storage(self.0.backward(contiguous(z, l1, op)?, g)),
                shape,
            )),
            CpuStorage::F64(z) => Ok((
                Real::storage(self.0.backward(contiguous(z, l1, op)?, g)),
                shape,
            )),
            _ => candle_core::bail!("{op}: logits must be f32 or f64"),
        }
    }
}
