//! Intensity normalisation and clipping.

use ndarray::{ArrayView3, ArrayViewMut3, Axis, Zip};
use serde::{Deserialize, Serialize};

use crate::volume::Image;

/// How each channel of an image is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Normalization {
    /// No change.
    None,
    /// `(x − μ) / σ` over the whole volume (σ = 0 → 1). formulas §6, CT and the phantom.
    #[default]
    ZScore,
    /// `(x − μ) / σ` with μ, σ over the non-zero voxels of the channel; zero voxels stay 0
    /// (MONAI `NormalizeIntensity(nonzero=True)`, nnU-Net's brain MRI scheme).
    ZScoreNonZero,
    /// Clip to the `[lower, upper]` percentiles (numpy's linear interpolation) over the
    /// foreground-agnostic volume, then z-score (nnU-Net's CT scheme with the data set's
    /// percentiles taken per volume).
    PercentileZScore {
        /// Lower percentile in `[0, 100]`, e.g. 0.5.
        lower: f64,
        /// Upper percentile in `[0, 100]`, e.g. 99.5.
        upper: f64,
    },
    /// A fixed intensity window (MONAI's `ScaleIntensityRange`, the usual CT preprocessing):
    /// `x' = (x − a_min) / (a_max − a_min) · (b_max − b_min) + b_min`, then clamped to
    /// `[b_min, b_max]` when `clip`. E.g. the abdominal window a_min −175, a_max 250 HU to
    /// `[0, 1]` with clipping.
    ScaleRange {
        /// Input value mapped to `b_min`.
        a_min: f64,
        /// Input value mapped to `b_max`.
        a_max: f64,
        /// Output at `a_min`.
        b_min: f64,
        /// Output at `a_max`.
        b_max: f64,
        /// Clamp the output to `[b_min, b_max]`.
        #[serde(default)]
        clip: bool,
    },
    /// nnU-Net's CT scheme: clip to the 0.5 and 99.5 percentiles of the training set's
    /// foreground voxels (label > 0, every case weighing the same), then `(x − μ) / max(σ, 1e-8)` with their mean and
    /// population σ. A request: training measures the statistics
    /// ([`ForegroundIntensities`]) and records [`Normalization::ClipZScore`] in their place;
    /// normalising with the request itself is an error.
    NnunetCt,
    /// `x' = (clip(x, lower_bound, upper_bound) − mean) / max(std, 1e-8)`: nnU-Net's
    /// `CTNormalization` with fixed intensity properties (what [`Normalization::NnunetCt`]
    /// becomes once the training set is measured).
    ClipZScore {
        /// Lower clipping bound (nnU-Net's `percentile_00_5`).
        lower_bound: f64,
        /// Upper clipping bound (`percentile_99_5`).
        upper_bound: f64,
        /// Subtracted after clipping (`mean`, of the unclipped foreground).
        mean: f64,
        /// Divided by, at least 1e-8 (`std`, population, of the unclipped foreground).
        std: f64,
    },
}

impl Normalization {
    /// Checks the parameters: percentiles in `[0, 100]` with `lower ≤ upper`; a window with
    /// finite ends, `a_min ≠ a_max`, and `b_min ≤ b_max` when clipping; clipping bounds, mean
    /// and σ finite with `lower_bound ≤ upper_bound` and `σ ≥ 0`.
    pub fn validate(&self) -> crate::Result<()> {
        let invalid = |m: String| Err(crate::DataError::Invalid(m));
        match *self {
            Normalization::PercentileZScore { lower, upper }
                if !((0.0..=100.0).contains(&lower)
                    && (0.0..=100.0).contains(&upper)
                    && lower <= upper) =>
            {
                invalid(format!(
                    "normalization percentiles {lower}, {upper}: need 0 ≤ lower ≤ upper ≤ 100"
                ))
            }
            Normalization::ScaleRange {
                a_min,
                a_max,
                b_min,
                b_max,
                clip,
            } if ![a_min, a_max, b_min, b_max].iter().all(|v| v.is_finite())
                || a_min == a_max
                || (clip && b_min > b_max) =>
            {
                invalid(format!(
                    "normalization window a_min {a_min}, a_max {a_max}, b_min {b_min}, b_max {b_max}: \
                     need finite values, a_min ≠ a_max, and b_min ≤ b_max when clipping"
                ))
            }
            Normalization::ClipZScore {
                lower_bound,
                upper_bound,
                mean,
                std,
            } if ![lower_bound, upper_bound, mean, std]
                .iter()
                .all(|v| v.is_finite())
                || lower_bound > upper_bound
                || std < 0.0 =>
            {
                invalid(format!(
                    "normalization bounds {lower_bound}, {upper_bound}, mean {mean}, std {std}: \
                     need finite values, lower_bound ≤ upper_bound and std ≥ 0"
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether this still needs the training set's statistics ([`Normalization::NnunetCt`]).
    pub fn needs_dataset_statistics(&self) -> bool {
        matches!(self, Normalization::NnunetCt)
    }
}

/// Normalises every channel of `image` in place. Refuses [`Normalization::NnunetCt`], whose
/// statistics are not known yet.
pub fn normalize(image: &mut Image, normalization: Normalization) -> crate::Result<()> {
    for channel in image.data.axis_iter_mut(Axis(0)) {
        normalize_channel(channel, normalization)?;
    }
    Ok(())
}

/// Normalises one channel in place (see [`normalize`]); parameters that
/// [`Normalization::validate`] refuses are an error.
pub fn normalize_channel(
    mut data: ArrayViewMut3<f32>,
    normalization: Normalization,
) -> crate::Result<()> {
    normalization.validate()?;
    match normalization {
        Normalization::None => {}
        Normalization::ZScore => zscore(data, None),
        Normalization::ZScoreNonZero => {
            let mask = data.mapv(|v| v != 0.0);
            zscore(data, Some(mask.view()));
        }
        Normalization::PercentileZScore { lower, upper } => {
            if let Some(p) = percentiles(data.iter().copied(), &[lower, upper]) {
                clip(data.view_mut(), p[0] as f32, p[1] as f32);
            }
            zscore(data, None);
        }
        Normalization::ScaleRange {
            a_min,
            a_max,
            b_min,
            b_max,
            clip: clamp,
        } => {
            let scale = (b_max - b_min) / (a_max - a_min);
            data.mapv_inplace(|v| ((v as f64 - a_min) * scale + b_min) as f32);
            if clamp {
                clip(data, b_min as f32, b_max as f32);
            }
        }
        Normalization::NnunetCt => {
            return Err(crate::DataError::Invalid(
                "normalization nnunet_ct needs the training set's foreground statistics: \
                 training measures them and records clip_z_score in the model card"
                    .into(),
            ));
        }
        Normalization::ClipZScore {
            lower_bound,
            upper_bound,
            mean,
            std,
        } => {
            let sd = std.max(1e-8);
            data.mapv_inplace(|v| {
                ((v.clamp(lower_bound as f32, upper_bound as f32) as f64 - mean) / sd) as f32
            });
        }
    }
    Ok(())
}

/// `(x − μ) / σ` with μ and the population σ over the voxels of `mask` (all voxels when `None`);
/// σ < 1e-8 is taken as 1. With a mask, voxels outside it are set to 0.
pub fn zscore(mut data: ArrayViewMut3<f32>, mask: Option<ArrayView3<bool>>) {
    let (mut n, mut sum, mut sum2) = (0usize, 0.0f64, 0.0f64);
    let mut add = |v: f32| {
        n += 1;
        sum += v as f64;
        sum2 += (v as f64) * (v as f64);
    };
    match &mask {
        Some(m) => Zip::from(&data).and(m).for_each(|&v, &k| {
            if k {
                add(v)
            }
        }),
        None => data.iter().for_each(|&v| add(v)),
    }
    if n == 0 {
        return;
    }
    let mean = sum / n as f64;
    let var = (sum2 / n as f64 - mean * mean).max(0.0);
    let sd = if var.sqrt() < 1e-8 { 1.0 } else { var.sqrt() };
    match mask {
        Some(m) => Zip::from(&mut data).and(&m).for_each(|v, &k| {
            *v = if k {
                ((*v as f64 - mean) / sd) as f32
            } else {
                0.0
            }
        }),
        None => data.mapv_inplace(|v| ((v as f64 - mean) / sd) as f32),
    }
}

/// Clamps every voxel to `[lo, hi]`.
pub fn clip(mut data: ArrayViewMut3<f32>, lo: f32, hi: f32) {
    data.mapv_inplace(|v| v.clamp(lo, hi));
}

/// The `q`-th percentile (`q` in `[0, 100]`) with numpy's default linear interpolation
/// (selection with bounded stack depth); 0 for no voxels, NaN when a voxel is NaN.
pub fn percentile(data: ArrayView3<f32>, q: f64) -> f32 {
    if data.is_empty() {
        return 0.0;
    }
    percentiles(data.iter().copied(), &[q]).map_or(f32::NAN, |p| p[0] as f32)
}

/// The percentiles `qs` (each in `[0, 100]`, clamped) of `values`, numpy's linear
/// interpolation ([`cwseg_metrics::quantile`]: bounded stack depth); `None` for no values or a
/// NaN.
fn percentiles(values: impl Iterator<Item = f32>, qs: &[f64]) -> Option<Vec<f64>> {
    let mut values: Vec<f64> = values.map(f64::from).collect();
    let qs: Vec<f64> = qs.iter().map(|q| q / 100.0).collect();
    cwseg_metrics::quantile::quantiles(&mut values, &qs)
}

/// Foreground voxels allowed per case when `n` cases are measured: `10^7 / n` (at least 1000),
/// so that a data set's sample fits in 40 MB. nnU-Net draws `10^8 / n` per case at random, with
/// replacement; a case with more foreground voxels than this is subsampled with a fixed stride.
pub fn foreground_voxels_per_case(cases: usize) -> usize {
    (10_000_000 / cases.max(1)).max(1000)
}

/// The foreground voxels (label > 0) of one channel over a data set's training cases, kept case
/// by case: nnU-Net's data set fingerprint, from which [`Normalization::NnunetCt`] takes its
/// numbers. Every case weighs the same, whatever its foreground size: nnU-Net draws `10^8 / n`
/// voxels with replacement from each of the `n` cases, so its statistics are those of the
/// mixture `F = (1/m) Σ_c F_c` of the cases' distributions (pooling the voxels instead weighs a
/// case by its foreground: 55 % off nnU-Net's FLAIR mean on the 12 BraTS cases, PLANNING.md).
///
/// With `m` cases holding foreground and case `c` keeping `n_c` voxels `v` (at most `per_case`,
/// every `k`-th with `k = ⌈count / per_case⌉`), every voxel of case `c` weighs
/// `w = 1 / (m · n_c)` and the weights sum to 1:
///
/// ```text
/// mean = Σ_c (1/m)(1/n_c) Σ_{v ∈ c} v
/// σ²   = Σ_c (1/m)(1/n_c) Σ_{v ∈ c} (v − mean)²          (population)
/// ```
///
/// The `q`-quantile is the weighted generalisation of numpy's linear interpolation. Let
/// `u_1 < … < u_K` be the distinct values, `M_k` the weight of the voxels equal to `u_k`, `c_k`
/// their count, `w̄_k = M_k / c_k` and `S_k = M_1 + … + M_k`. Each voxel's weight is centred on
/// its share of the cumulative weight, so those of `u_k` span `[a_k, b_k] =
/// [S_{k−1} + w̄_k/2, S_k − w̄_k/2]` (equal values share their weight evenly, so the order of
/// ties does not matter). The quantile function is `u_k` on `[a_k, b_k]` and linear from `u_k`
/// to `u_{k+1}` on `[b_k, a_{k+1}]`; the `q`-quantile is its value at `a_1 + q·(b_K − a_1)`.
/// With equal weights (one case, or cases of equal size) the centres are the ranks and this is
/// numpy's `percentile` of the pooled voxels, which is then computed by numpy's rule itself
/// (exactly: one case gives numpy's mean, population std and percentiles). With unequal weights
/// it converges to the mixture's inverse CDF, the limit of nnU-Net's sampled percentiles.
/// `min` and `max` are those of the kept voxels, `voxels` their number `Σ_c n_c`.
#[derive(Debug, Clone)]
pub struct ForegroundIntensities {
    /// The kept foreground voxels of each case with foreground.
    cases: Vec<Vec<f32>>,
    per_case: usize,
}

impl ForegroundIntensities {
    /// An empty pool that keeps at most `per_case` voxels of each case
    /// ([`foreground_voxels_per_case`]).
    pub fn new(per_case: usize) -> Self {
        ForegroundIntensities {
            cases: Vec::new(),
            per_case: per_case.max(1),
        }
    }

    /// Adds one case: the voxels of `channel` where `label > 0` (every `k`-th of them, `k` the
    /// smallest stride that keeps at most `per_case`); a case without foreground adds nothing.
    /// Refuses different shapes and NaN intensities.
    pub fn add(&mut self, channel: ArrayView3<f32>, label: ArrayView3<u8>) -> crate::Result<()> {
        if channel.shape() != label.shape() {
            return Err(crate::DataError::Invalid(format!(
                "foreground intensities: image {:?} and labels {:?} differ in shape",
                channel.shape(),
                label.shape()
            )));
        }
        let mut foreground = Vec::new();
        Zip::from(&channel).and(&label).for_each(|&x, &l| {
            if l > 0 {
                foreground.push(x);
            }
        });
        if foreground.iter().any(|v| v.is_nan()) {
            return Err(crate::DataError::Invalid(
                "foreground intensities: the image holds NaN voxels".into(),
            ));
        }
        if !foreground.is_empty() {
            let stride = foreground.len().div_ceil(self.per_case);
            self.cases
                .push(foreground.into_iter().step_by(stride).collect());
        }
        Ok(())
    }

    /// Voxels kept so far.
    pub fn len(&self) -> usize {
        self.cases.iter().map(Vec::len).sum()
    }

    /// Whether no voxel was kept.
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// The statistics of the mixture of the cases (see [`ForegroundIntensities`]); an error
    /// when no case had foreground.
    pub fn properties(&self) -> crate::Result<IntensityProperties> {
        let q = self.quantiles(&[0.005, 0.5, 0.995]).ok_or_else(|| {
            crate::DataError::Invalid(
                "foreground intensities: no training case has foreground voxels".into(),
            )
        })?;
        let mean = self.weighted_sum(|v| v);
        let var = self.weighted_sum(|v| (v - mean).powi(2));
        let (min, max) = self
            .cases
            .iter()
            .flatten()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        Ok(IntensityProperties {
            voxels: self.len(),
            mean,
            std: var.sqrt(),
            median: q[1],
            min: f64::from(min),
            max: f64::from(max),
            percentile_00_5: q[0],
            percentile_99_5: q[2],
        })
    }

    /// `Σ_c (1/m)(1/n_c) Σ_{v ∈ c} f(v)`.
    fn weighted_sum(&self, f: impl Fn(f64) -> f64) -> f64 {
        let per_case = self
            .cases
            .iter()
            .map(|c| c.iter().map(|&v| f(f64::from(v))).sum::<f64>() / c.len() as f64);
        per_case.sum::<f64>() / self.cases.len() as f64
    }

    /// The quantiles `qs` (in `[0, 1]`) of the mixture; `None` without voxels.
    fn quantiles(&self, qs: &[f64]) -> Option<Vec<f64>> {
        let first = self.cases.first()?.len();
        if self.cases.iter().all(|c| c.len() == first) {
            let percent: Vec<f64> = qs.iter().map(|q| q * 100.0).collect();
            return percentiles(self.cases.iter().flatten().copied(), &percent);
        }
        let (pairs, weights) = weighted_voxels(&self.cases);
        Some(weighted_quantiles(&pairs, &weights, qs))
    }
}

/// Equal values of the pooled voxels: the value, its total weight and its count.
#[derive(Debug, Clone, Copy)]
struct Run {
    value: f64,
    mass: f64,
    count: usize,
}

impl Run {
    /// The run of equal values `pairs` (value, case), case `c` weighing `weights[c]` a voxel.
    fn new(pairs: &[(f32, u32)], weights: &[f64]) -> Self {
        Run {
            value: pairs.first().map_or(f64::NAN, |p| f64::from(p.0)),
            mass: pairs.iter().map(|p| weights[p.1 as usize]).sum(),
            count: pairs.len(),
        }
    }

    /// Half the mean weight of a voxel of the run.
    fn half(&self) -> f64 {
        self.mass / self.count as f64 / 2.0
    }
}

/// The cases' voxels as `(value, case)` sorted by value, and each case's weight per voxel
/// `1 / (m · n_c)`.
fn weighted_voxels(cases: &[Vec<f32>]) -> (Vec<(f32, u32)>, Vec<f64>) {
    let m = cases.len() as f64;
    let weights = cases.iter().map(|c| 1.0 / (m * c.len() as f64)).collect();
    let mut pairs: Vec<(f32, u32)> = Vec::with_capacity(cases.iter().map(Vec::len).sum());
    for (i, c) in cases.iter().enumerate() {
        pairs.extend(c.iter().map(|&v| (v, i as u32)));
    }
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    (pairs, weights)
}

/// The weighted linear-interpolation quantiles `qs` (clamped to `[0, 1]`) of the sorted
/// `pairs` (the rule of [`ForegroundIntensities`]); NaN without voxels.
fn weighted_quantiles(pairs: &[(f32, u32)], weights: &[f64], qs: &[f64]) -> Vec<f64> {
    let runs = || {
        pairs
            .chunk_by(|a, b| a.0 == b.0)
            .map(|run| Run::new(run, weights))
    };
    let (Some(first), Some(last)) = (runs().next(), runs().next_back()) else {
        return vec![f64::NAN; qs.len()];
    };
    let total: f64 = runs().map(|r| r.mass).sum();
    let (start, end) = (first.half(), total - last.half());
    qs.iter()
        .map(|&q| quantile_at(runs(), start + q.clamp(0.0, 1.0) * (end - start)))
        .collect()
}

/// The value at `t` of the quantile function of ascending `runs`: a run's value over the span
/// `[a, b]` of its voxels' weight centres, linear between one run's `b` and the next's `a`.
fn quantile_at(runs: impl Iterator<Item = Run>, t: f64) -> f64 {
    let (mut cumulative, mut previous) = (0.0, None::<(f64, f64)>);
    for run in runs {
        let (a, b) = (cumulative + run.half(), cumulative + run.mass - run.half());
        cumulative += run.mass;
        match previous {
            Some((pb, pv)) if t < a => return pv + (t - pb) / (a - pb) * (run.value - pv),
            _ if t <= b => return run.value,
            _ => previous = Some((b, run.value)),
        }
    }
    previous.map_or(f64::NAN, |p| p.1)
}

/// Foreground intensity statistics of one channel (nnU-Net's
/// `foreground_intensity_properties_per_channel`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IntensityProperties {
    /// Voxels measured.
    pub voxels: usize,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Median.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// 0.5th percentile.
    pub percentile_00_5: f64,
    /// 99.5th percentile.
    pub percentile_99_5: f64,
}

impl IntensityProperties {
    /// nnU-Net's `CTNormalization` with these properties.
    pub fn ct_normalization(&self) -> Normalization {
        Normalization::ClipZScore {
            lower_bound: self.percentile_00_5,
            upper_bound: self.percentile_99_5,
            mean: self.mean,
            std: self.std,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn case(values: &[f32]) -> (Array3<f32>, Array3<u8>) {
        let n = values.len();
        let image = Array3::from_shape_vec((1, 1, n), values.to_vec()).expect("shape");
        (image, Array3::ones((1, 1, n)))
    }

    /// Four voxels of 0 and one of 10: mean 5, σ 5; the 99.5th percentile interpolates between
    /// the centres 7/16 (last 0) and 3/4 (the 10) at 1/16 + 0.995 · 11/16.
    #[test]
    fn every_case_weighs_the_same() {
        let mut pool = ForegroundIntensities::new(100);
        let (zeros, label) = case(&[0.0; 4]);
        pool.add(zeros.view(), label.view()).expect("same shapes");
        let (ten, one) = case(&[10.0]);
        pool.add(ten.view(), one.view()).expect("same shapes");
        assert!(pool.add(zeros.view(), one.view()).is_err());
        let p = pool.properties().expect("statistics");
        assert_eq!(
            (p.mean, p.std, p.voxels, p.min, p.max),
            (5.0, 5.0, 5, 0.0, 10.0)
        );
        assert_eq!((p.percentile_00_5, p.median), (0.0, 0.0));
        assert!(
            (p.percentile_99_5 - 9.89).abs() < 1e-12,
            "{}",
            p.percentile_99_5
        );
        assert!(ForegroundIntensities::new(1).properties().is_err());
    }

    /// With equal weights the weighted rule is numpy's linear interpolation, ties included.
    #[test]
    fn equal_weights_give_numpy_percentiles() {
        let a: Vec<f32> = (0..37).map(|i| ((i * 7919) % 23) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..37).map(|i| ((i * 104_729) % 31) as f32 * 0.5).collect();
        let qs = [0.0, 0.005, 0.123, 0.5, 0.77, 0.995, 1.0];
        let cases = vec![a.clone(), b.clone()];
        let (pairs, weights) = weighted_voxels(&cases);
        let got = weighted_quantiles(&pairs, &weights, &qs);
        let mut pooled: Vec<f64> = a.iter().chain(&b).map(|&v| f64::from(v)).collect();
        let want = cwseg_metrics::quantile::quantiles(&mut pooled, &qs).expect("values");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }

    /// Cases without foreground are skipped: they neither weigh nor count.
    #[test]
    fn empty_cases_do_not_count() {
        let mut pool = ForegroundIntensities::new(10);
        let (image, label) = case(&[1.0, 3.0]);
        pool.add(image.view(), Array3::zeros((1, 1, 2)).view())
            .expect("same shapes");
        assert!(pool.is_empty());
        pool.add(image.view(), label.view()).expect("same shapes");
        let p = pool.properties().expect("statistics");
        assert_eq!((p.mean, p.std, p.median, pool.len()), (2.0, 1.0, 2.0, 2));
    }
}
