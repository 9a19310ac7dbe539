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
    /// `(x − μ) / σ` over the whole volume (σ = 0 → 1). SPEC §6, CT and the phantom.
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
}

impl Normalization {
    /// Checks the parameters: percentiles in `[0, 100]` with `lower ≤ upper`; a window with
    /// finite ends, `a_min ≠ a_max`, and `b_min ≤ b_max` when clipping.
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
            _ => Ok(()),
        }
    }
}

/// Normalises every channel of `image` in place.
pub fn normalize(image: &mut Image, normalization: Normalization) {
    for channel in image.data.axis_iter_mut(Axis(0)) {
        normalize_channel(channel, normalization);
    }
}

/// Normalises one channel in place.
pub fn normalize_channel(mut data: ArrayViewMut3<f32>, normalization: Normalization) {
    match normalization {
        Normalization::None => {}
        Normalization::ZScore => zscore(data, None),
        Normalization::ZScoreNonZero => {
            let mask = data.mapv(|v| v != 0.0);
            zscore(data, Some(mask.view()));
        }
        Normalization::PercentileZScore { lower, upper } => {
            let lo = percentile(data.view(), lower);
            let hi = percentile(data.view(), upper);
            clip(data.view_mut(), lo, hi);
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
    }
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

/// The `q`-th percentile (`q` in `[0, 100]`) with numpy's default linear interpolation.
pub fn percentile(data: ArrayView3<f32>, q: f64) -> f32 {
    let mut values: Vec<f32> = data.iter().copied().collect();
    if values.is_empty() {
        return 0.0;
    }
    let rank = q.clamp(0.0, 100.0) / 100.0 * (values.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = (lo + 1).min(values.len() - 1);
    let (_, &mut a, rest) = values.select_nth_unstable_by(lo, f32::total_cmp);
    let b = if hi == lo {
        a
    } else {
        rest.iter().copied().fold(f32::INFINITY, f32::min)
    };
    (a as f64 + (rank - lo as f64) * (b as f64 - a as f64)) as f32
}
