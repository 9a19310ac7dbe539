//! Sliding-window tiling for inference: window positions with overlap, the Gaussian importance
//! map, and blending of overlapping window predictions (MONAI's `sliding_window_inference`).
//! Running the model on each window is the caller's job.

use ndarray::{Array3, Array4, ArrayView4, Zip, s};

use crate::error::{DataError, Result};

/// The window starts `[z, y, x]` covering a volume of `shape` (at least `window` in every axis:
/// pad first), MONAI's `dense_patch_slices`: step `⌊window · (1 − overlap)⌋` (at least 1; the
/// whole axis when the window equals it), the last window moved back to end at the border.
pub fn window_positions(
    shape: [usize; 3],
    window: [usize; 3],
    overlap: f64,
) -> Result<Vec<[usize; 3]>> {
    if !(0.0..1.0).contains(&overlap) {
        return Err(DataError::Invalid(format!(
            "overlap {overlap} must be in [0, 1)"
        )));
    }
    if window.contains(&0) || (0..3).any(|a| window[a] > shape[a]) {
        return Err(DataError::Invalid(format!(
            "window {window:?} must be non-zero and fit the volume {shape:?} (pad it first)"
        )));
    }
    let mut starts: [Vec<usize>; 3] = Default::default();
    for a in 0..3 {
        let interval = if window[a] == shape[a] {
            window[a]
        } else {
            ((window[a] as f64 * (1.0 - overlap)) as usize).max(1)
        };
        let num = shape[a].div_ceil(interval);
        let count = (0..num)
            .find(|d| d * interval + window[a] >= shape[a])
            .map_or(1, |d| d + 1);
        starts[a] = (0..count)
            .map(|i| {
                let start = i * interval;
                start - (start + window[a]).saturating_sub(shape[a])
            })
            .collect();
    }
    let mut out = Vec::new();
    for &z in &starts[0] {
        for &y in &starts[1] {
            for &x in &starts[2] {
                out.push([z, y, x]);
            }
        }
    }
    Ok(out)
}

/// The Gaussian importance map of a window: MONAI's
/// `compute_importance_map(window, mode="gaussian", sigma_scale)` (1.2 and later; 1.1 clamped in
/// `sliding_window_inference` instead), the weights of `sliding_window_inference(mode="gaussian")`.
/// In f32, `w(i) = Π_a exp(−t_a² / (2 σ_a²))` sampled at `t_a = i_a − (n_a − 1) / 2` (the
/// window's centre, between two voxels on even sides), `σ_a = sigma_scale · n_a` (0.125 by
/// default), then clamped below at `max(min w, 1e-3)`. It is not normalised: its maximum is the
/// product of the central samples (< 1 on even sides). Checked against MONAI 1.6.1's map for
/// odd, even and mixed windows and sides of 1 and 2 (`tests/reference.rs`). MONAI 1.0 and
/// earlier filtered a delta at `n_a / 2` with an erf-integrated kernel truncated at 4σ and
/// normalised it to a maximum of 1: another map (up to 0.26 apart at 16³), not this one.
pub fn gaussian_importance(window: [usize; 3], sigma_scale: f64) -> Array3<f32> {
    let axis = |n: usize| -> Vec<f32> {
        let sigma = (sigma_scale * n as f64) as f32;
        (0..n)
            .map(|i| {
                let t = i as f32 - (n as f32 - 1.0) / 2.0;
                (t * t / (-2.0 * sigma * sigma)).exp()
            })
            .collect()
    };
    let (gz, gy, gx) = (axis(window[0]), axis(window[1]), axis(window[2]));
    let mut map = Array3::from_shape_fn(window, |(z, y, x)| gz[z] * gy[y] * gx[x]);
    let min = map.iter().copied().fold(f32::INFINITY, f32::min).max(1e-3);
    map.mapv_inplace(|v| v.max(min));
    map
}

/// Accumulates importance-weighted window predictions `[k, wz, wy, wx]` into a volume and
/// normalises by the summed weights.
#[derive(Debug, Clone)]
pub struct Blender {
    sum: Array4<f32>,
    weight: Array3<f32>,
    importance: Array3<f32>,
}

impl Blender {
    /// A blender for `channels` outputs over a volume of `shape`, windows of `window` weighted
    /// by the Gaussian importance map with `sigma_scale` (0.125: formulas §6).
    pub fn new(channels: usize, shape: [usize; 3], window: [usize; 3], sigma_scale: f64) -> Self {
        Blender::with_importance(channels, shape, gaussian_importance(window, sigma_scale))
    }

    /// A blender whose windows (of the importance map's shape) are weighted by `importance`
    /// (all ones: MONAI's `mode="constant"`, a plain mean of the overlapping windows).
    pub fn with_importance(channels: usize, shape: [usize; 3], importance: Array3<f32>) -> Self {
        Blender {
            sum: Array4::zeros((channels, shape[0], shape[1], shape[2])),
            weight: Array3::zeros(shape),
            importance,
        }
    }

    /// Adds the prediction of the window starting at `start`.
    pub fn add(&mut self, start: [usize; 3], prediction: ArrayView4<f32>) -> Result<()> {
        let (k, wz, wy, wx) = prediction.dim();
        let (kk, nz, ny, nx) = self.sum.dim();
        if k != kk
            || [wz, wy, wx]
                != [
                    self.importance.dim().0,
                    self.importance.dim().1,
                    self.importance.dim().2,
                ]
            || start[0] + wz > nz
            || start[1] + wy > ny
            || start[2] + wx > nx
        {
            return Err(DataError::Invalid(format!(
                "window prediction of shape {:?} at {start:?} does not fit a blender of shape {:?}",
                prediction.shape(),
                self.sum.shape()
            )));
        }
        let region = s![
            start[0]..start[0] + wz,
            start[1]..start[1] + wy,
            start[2]..start[2] + wx
        ];
        let mut weight = self.weight.slice_mut(region);
        weight += &self.importance;
        for (c, p) in prediction.outer_iter().enumerate() {
            let mut sum = self.sum.slice_mut(s![
                c,
                start[0]..start[0] + wz,
                start[1]..start[1] + wy,
                start[2]..start[2] + wx
            ]);
            Zip::from(&mut sum)
                .and(&p)
                .and(&self.importance)
                .for_each(|acc, &v, &w| *acc += v * w);
        }
        Ok(())
    }

    /// The blended volume `[k, z, y, x]`.
    pub fn finish(self) -> Array4<f32> {
        let mut sum = self.sum;
        for mut c in sum.outer_iter_mut() {
            c.zip_mut_with(&self.weight, |v, &w| {
                *v = if w > 0.0 { *v / w } else { 0.0 }
            });
        }
        sum
    }
}

/// The class index with the largest value at every voxel of `[k, z, y, x]` (first on ties).
pub fn argmax(scores: ArrayView4<f32>) -> Array3<u8> {
    let (k, z, y, x) = scores.dim();
    Array3::from_shape_fn((z, y, x), |(i, j, l)| {
        let mut best = 0usize;
        for c in 1..k {
            if scores[[c, i, j, l]] > scores[[best, i, j, l]] {
                best = c;
            }
        }
        best as u8
    })
}
