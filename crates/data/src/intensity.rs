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
    /// foreground voxels (label > 0), then `(x − μ) / max(σ, 1e-8)` with their mean and
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

/// The foreground voxels (label > 0) of one channel, pooled over a data set's training cases:
/// nnU-Net's data set fingerprint, from which [`Normalization::NnunetCt`] takes its numbers.
#[derive(Debug, Clone)]
pub struct ForegroundIntensities {
    values: Vec<f32>,
    per_case: usize,
}

impl ForegroundIntensities {
    /// An empty pool that keeps at most `per_case` voxels of each case
    /// ([`foreground_voxels_per_case`]).
    pub fn new(per_case: usize) -> Self {
        ForegroundIntensities {
            values: Vec::new(),
            per_case: per_case.max(1),
        }
    }

    /// Adds the voxels of `channel` where `label > 0` (every `k`-th of them, `k` the smallest
    /// stride that keeps at most `per_case`). Refuses different shapes and NaN intensities.
    pub fn add(&mut self, channel: ArrayView3<f32>, label: ArrayView3<u8>) -> crate::Result<()> {
        if channel.shape() != label.shape() {
            return Err(crate::DataError::Invalid(format!(
                "foreground intensities: image {:?} and labels {:?} differ in shape",
                channel.shape(),
                label.shape()
            )));
        }
        let count = label.iter().filter(|&&l| l > 0).count();
        let stride = count.div_ceil(self.per_case).max(1);
        let foreground =
            Zip::from(&channel)
                .and(&label)
                .fold(Vec::with_capacity(count), |mut v, &x, &l| {
                    if l > 0 {
                        v.push(x);
                    }
                    v
                });
        if foreground.iter().any(|v| v.is_nan()) {
            return Err(crate::DataError::Invalid(
                "foreground intensities: the image holds NaN voxels".into(),
            ));
        }
        self.values.extend(foreground.into_iter().step_by(stride));
        Ok(())
    }

    /// Voxels pooled so far.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no voxel was pooled.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The pool's statistics (numpy's `mean`, population `std`, `percentile` with linear
    /// interpolation); an error when no case had foreground.
    pub fn properties(&self) -> crate::Result<IntensityProperties> {
        let n = self.values.len();
        let p = percentiles(self.values.iter().copied(), &[0.5, 50.0, 99.5]).ok_or_else(|| {
            crate::DataError::Invalid(
                "foreground intensities: no training case has foreground voxels".into(),
            )
        })?;
        let mean = self.values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = self
            .values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let (min, max) = self
            .values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        Ok(IntensityProperties {
            voxels: n,
            mean,
            std: var.sqrt(),
            median: p[1],
            min: min as f64,
            max: max as f64,
            percentile_00_5: p[0],
            percentile_99_5: p[2],
        })
    }
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
