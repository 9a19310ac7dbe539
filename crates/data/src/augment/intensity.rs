//! The deterministic cores of nnU-Net's image-only augmentations (nnU-Net v2's
//! `get_training_transforms`, batchgeneratorsv2): each acts on one channel `[z, y, x]` with its
//! parameters given, so that the random draws stay in [`super::Augmentation::draw`] and each
//! core can be checked against numpy/scipy (`scripts/fixtures/augment_fixtures.py`). Sums,
//! statistics and interpolation run in f64.

use ndarray::{Array3, ArrayViewMut3, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Adds `sigma · n` to every voxel, `n` standard normal from a ChaCha8 stream seeded with
/// `seed`, in C order (the same seed gives every channel the same noise field, as nnU-Net's
/// `GaussianNoiseTransform` with synchronised channels).
pub fn gaussian_noise(mut channel: ArrayViewMut3<f32>, sigma: f64, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for v in channel.iter_mut() {
        let n: f64 = StandardNormal.sample(&mut rng);
        *v = (f64::from(*v) + sigma * n) as f32;
    }
}

/// nnU-Net's Gaussian kernel of `sigma` voxels: `k` taps, `k` the odd integer nearest to
/// `6σ + ½` (`round` with ties to even, then an even result moves towards `6σ + ½`), weights
/// `exp(−½ ((i − h)/σ)²)` for `i = 0..k`, `h = (k − 1)/2`, summing to one. `σ ≤ 0` (or not
/// finite) is no blur: the kernel `[1]`; a σ above [`super::MAX_BLUR_SIGMA`] is taken as that
/// (was: a capacity-overflow panic in the loader for σ = 10^30).
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return vec![1.0];
    }
    let sigma = sigma.min(super::MAX_BLUR_SIGMA);
    let t = 6.0 * sigma + 0.5;
    let rounded = t.round_ties_even();
    let k = if rounded % 2.0 == 1.0 {
        rounded
    } else if t >= rounded {
        rounded + 1.0
    } else {
        rounded - 1.0
    };
    let k = k.max(1.0) as usize;
    let h = (k as f64 - 1.0) / 2.0;
    let w: Vec<f64> = (0..k)
        .map(|i| (-0.5 * ((i as f64 - h) / sigma).powi(2)).exp())
        .collect();
    let total: f64 = w.iter().sum();
    w.into_iter().map(|v| v / total).collect()
}

/// Index `i` (possibly outside `0..n`) reflected into `0..n` without repeating the edge voxel
/// (`… 2 1 | 0 1 2 … n−1 | n−2 …`: PyTorch's `reflect` padding, scipy's `mirror` mode).
pub fn reflect_index(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let r = i.rem_euclid(period);
    (if r < n as isize { r } else { period - r }) as usize
}

/// Separable Gaussian blur with `sigma[a]` voxels along axis `a` of `[z, y, x]`: each axis in
/// turn convolved with [`gaussian_kernel`], reflected borders ([`reflect_index`]); nnU-Net's
/// `GaussianBlurTransform` (scipy: `gaussian_filter(x, σ, mode="mirror", radius=h)`).
pub fn gaussian_blur(mut channel: ArrayViewMut3<f32>, sigma: [f64; 3]) {
    for (axis, &s) in sigma.iter().enumerate() {
        let kernel = gaussian_kernel(s);
        if kernel.len() == 1 {
            continue;
        }
        let h = (kernel.len() / 2) as isize;
        let mut lane_copy = Vec::new();
        for mut lane in channel.lanes_mut(Axis(axis)) {
            lane_copy.clear();
            lane_copy.extend(lane.iter().map(|&v| f64::from(v)));
            let n = lane_copy.len();
            for (i, v) in lane.iter_mut().enumerate() {
                let sum: f64 = kernel
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * lane_copy[reflect_index(i as isize + j as isize - h, n)])
                    .sum();
                *v = sum as f32;
            }
        }
    }
}

/// Multiplicative brightness: `x ← f · x` (nnU-Net's `MultiplicativeBrightnessTransform`).
pub fn brightness(mut channel: ArrayViewMut3<f32>, factor: f64) {
    channel.mapv_inplace(|v| (f64::from(v) * factor) as f32);
}

/// Mean and sample standard deviation (`n − 1` in the denominator, as `torch.std`; 0 for
/// fewer than two values), minimum and maximum of `values`.
fn statistics<I: Iterator<Item = f64> + Clone>(values: I) -> (f64, f64, f64, f64) {
    let count = values.clone().count();
    let n = count.max(1) as f64;
    let mean = values.clone().sum::<f64>() / n;
    let squares: f64 = values.clone().map(|v| (v - mean).powi(2)).sum();
    let std = if count > 1 {
        (squares / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    (mean, std, lo, hi)
}

/// Contrast about the mean `μ`, range preserved: `x ← clamp(μ + f (x − μ), min x, max x)`
/// (nnU-Net's `ContrastTransform` with `preserve_range`).
pub fn contrast(mut channel: ArrayViewMut3<f32>, factor: f64) {
    let (mean, _, lo, hi) = statistics(channel.iter().map(|&v| f64::from(v)));
    channel.mapv_inplace(|v| (mean + factor * (f64::from(v) - mean)).clamp(lo, hi) as f32);
}

/// nnU-Net's `GammaTransform`. With `invert`, `x ← −x` first and last. Between:
/// `x ← m + r · ((x − m) / max(r, 10⁻⁷))^γ` with `m = min x`, `r = max x − m`; with
/// `retain_stats`, then `x ← μ + (x − μ') · s / max(s', 10⁻⁷)`, where `μ, s` are the mean and
/// sample standard deviation before the power and `μ', s'` after it.
pub fn gamma(mut channel: ArrayViewMut3<f32>, gamma: f64, invert: bool, retain_stats: bool) {
    let sign = if invert { -1.0 } else { 1.0 };
    let mut x: Array3<f64> = channel.mapv(|v| sign * f64::from(v));
    let (mean, std, lo, hi) = statistics(x.iter().copied());
    let range = hi - lo;
    x.mapv_inplace(|v| lo + range * ((v - lo) / range.max(1e-7)).powf(gamma));
    if retain_stats {
        let (mean_now, std_now, _, _) = statistics(x.iter().copied());
        let scale = std / std_now.max(1e-7);
        x.mapv_inplace(|v| mean + (v - mean_now) * scale);
    }
    channel.zip_mut_with(&x, |c, &v| *c = (sign * v) as f32);
}

/// The side after a zoom by `zoom`: `round(n · zoom)`, ties to even (Python's `round`), at
/// least 1.
pub fn zoomed_side(n: usize, zoom: f64) -> usize {
    let m = (n as f64 * zoom).round_ties_even();
    if m.is_finite() && m >= 1.0 {
        m as usize
    } else {
        1
    }
}

/// Nearest neighbour resize of `x` along `axis` to `m` samples, PyTorch's `nearest-exact`:
/// output `o` takes input `min(⌊(2o + 1) n / (2m)⌋, n − 1)` (exact integer arithmetic).
fn nearest_along(x: &Array3<f64>, axis: usize, m: usize) -> Array3<f64> {
    let n = x.shape()[axis];
    let picks: Vec<usize> = (0..m)
        .map(|o| ((2 * o + 1) * n / (2 * m)).min(n - 1))
        .collect();
    x.select(Axis(axis), &picks)
}

/// Linear resize of `x` along `axis` to `m` samples, PyTorch's `align_corners=False`: output
/// `o` reads input position `p = max((o + ½) n/m − ½, 0)` as `(1 − λ) x[i] + λ x[i + 1]`,
/// `i = ⌊p⌋`, `λ = p − i`, the upper index clamped to `n − 1`.
fn linear_along(x: &Array3<f64>, axis: usize, m: usize) -> Array3<f64> {
    let n = x.shape()[axis];
    let mut shape = [x.dim().0, x.dim().1, x.dim().2];
    shape[axis] = m;
    let mut out = Array3::<f64>::zeros(shape);
    let step = n as f64 / m as f64;
    for o in 0..m {
        let p = ((o as f64 + 0.5) * step - 0.5).max(0.0);
        let i = (p as usize).min(n - 1);
        let lambda = p - i as f64;
        let (a, b) = (
            x.index_axis(Axis(axis), i),
            x.index_axis(Axis(axis), (i + 1).min(n - 1)),
        );
        let mut target = out.index_axis_mut(Axis(axis), o);
        ndarray::Zip::from(&mut target)
            .and(&a)
            .and(&b)
            .for_each(|t, &a, &b| *t = (1.0 - lambda) * a + lambda * b);
    }
    out
}

/// nnU-Net's `SimulateLowResolutionTransform` with one `zoom` for every axis: the channel
/// resized to `round(n · zoom)` voxels per axis ([`zoomed_side`]) by nearest neighbour
/// (`nearest-exact`), then back to its shape by trilinear interpolation (`align_corners=False`),
/// both separable.
pub fn low_resolution(mut channel: ArrayViewMut3<f32>, zoom: f64) {
    let shape = [channel.dim().0, channel.dim().1, channel.dim().2];
    let mut x: Array3<f64> = channel.mapv(f64::from);
    for (axis, &n) in shape.iter().enumerate() {
        x = nearest_along(&x, axis, zoomed_side(n, zoom));
    }
    for (axis, &n) in shape.iter().enumerate() {
        x = linear_along(&x, axis, n);
    }
    channel.zip_mut_with(&x, |c, &v| *c = v as f32);
}
