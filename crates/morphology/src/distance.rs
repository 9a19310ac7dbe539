//! Exact Euclidean distance transforms (Felzenszwalb & Huttenlocher 2012) with anisotropic
//! spacing, and signed distance maps.

use std::ops::Range;

use ndarray::{Array, Array3, ArrayView, ArrayView3, ArrayViewMut3, Axis, Zip};
use rayon::prelude::*;

use crate::Result;
use crate::grid::{Binary, Grid, active_axes, binary_volume, volume_spacing};

/// Exact Euclidean distance from every foreground voxel to the nearest background voxel, in
/// the units of `spacing` (one entry per axis, `[z, y, x]` or `[y, x]`; `None` is 1 voxel).
/// Background voxels get 0.
///
/// `edt(S)(v) = min { ‖(v − u) ⊙ spacing‖₂ : S(u) = 0 }`, equal to
/// `scipy.ndimage.distance_transform_edt(S, sampling=spacing)` (to float32 rounding). A mask
/// with no background voxel has no finite distance: every voxel is `+∞` (scipy returns
/// distances to a voxel outside the array there).
pub fn edt<T: Binary, D: Grid>(
    mask: ArrayView<'_, T, D>,
    spacing: Option<&[f64]>,
) -> Result<Array<f32, D>> {
    let spacing = volume_spacing::<D>(spacing)?;
    let mask = binary_volume(mask);
    let mut distance = squared_distance_to(mask.view(), |m| !m, spacing, active_axes::<D>());
    distance.par_mapv_inplace(f32::sqrt);
    Ok(D::from_volume(distance))
}

/// Signed distance to the object's boundary: `+edt(¬S)` outside the object (distance to the
/// nearest object voxel), `−edt(S)` inside (distance to the nearest background voxel), in
/// the units of `spacing`. Negative inside, as the boundary loss (Kervadec et al. 2019) uses it;
/// Kervadec's code adds 1 voxel inside so that the inner boundary is 0 instead of −1.
/// An empty or full mask has no boundary: the map is all zeros.
pub fn signed_distance<T: Binary, D: Grid>(
    mask: ArrayView<'_, T, D>,
    spacing: Option<&[f64]>,
) -> Result<Array<f32, D>> {
    let spacing = volume_spacing::<D>(spacing)?;
    let mask = binary_volume(mask);
    let any = mask.iter().any(|&m| m);
    let all = mask.iter().all(|&m| m);
    if !any || all {
        return Ok(D::from_volume(Array3::zeros(mask.raw_dim())));
    }
    let outside = squared_distance_to(mask.view(), |m| m, spacing, active_axes::<D>());
    let inside = squared_distance_to(mask.view(), |m| !m, spacing, active_axes::<D>());
    let mut signed = outside;
    Zip::from(&mut signed)
        .and(&inside)
        .and(&mask)
        .par_for_each(|s, &i, &m| *s = if m { -i.sqrt() } else { s.sqrt() });
    Ok(D::from_volume(signed))
}

/// Squared Euclidean distance from every voxel to the nearest voxel where `is_target` holds,
/// along `axes` of the `[z, y, x]` volume (`+∞` where there is none).
pub(crate) fn squared_distance_to<T: Copy + Sync>(
    volume: ArrayView3<'_, T>,
    is_target: impl Fn(T) -> bool + Sync,
    spacing: [f64; 3],
    axes: Range<usize>,
) -> Array3<f32> {
    let mut squared = Array3::from_elem(volume.raw_dim(), f32::INFINITY);
    if volume.is_empty() {
        return squared;
    }
    // x: distance to the nearest target in the row, two sweeps.
    let volume = volume.as_standard_layout();
    let width = volume.dim().2;
    let step = spacing[2];
    let far = f32::INFINITY;
    squared
        .as_slice_mut()
        .expect("a new array is contiguous")
        .par_chunks_mut(width)
        .zip(
            volume
                .as_slice()
                .expect("standard layout")
                .par_chunks(width),
        )
        .for_each(|(out, row)| {
            let mut last: Option<usize> = None;
            for (i, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                if is_target(v) {
                    last = Some(i);
                }
                *o = last.map_or(far, |l| (i - l) as f32);
            }
            let mut next: Option<usize> = None;
            for (i, (o, &v)) in out.iter_mut().zip(row).enumerate().rev() {
                if is_target(v) {
                    next = Some(i);
                }
                if let Some(n) = next {
                    *o = o.min((n - i) as f32);
                }
            }
            for o in out.iter_mut() {
                let d = (*o as f64 * step) as f32;
                *o = d * d;
            }
        });
    // y, then z: lower envelopes of parabolas over the previous axes' squared distances.
    if axes.contains(&1) {
        squared
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .for_each(|slice| {
                envelope_pass(
                    slice.insert_axis(Axis(0)).permuted_axes([1, 0, 2]),
                    spacing[1],
                );
            });
    }
    if axes.contains(&0) {
        squared
            .axis_iter_mut(Axis(1))
            .into_par_iter()
            .for_each(|rows| {
                envelope_pass(rows.insert_axis(Axis(1)), spacing[0]);
            });
    }
    squared
}

/// The 1D squared distance transform along axis 0 of `block` (`[len, 1, width]`), one lower
/// envelope per column. Columns of zeros (background only) are their own transform and are
/// skipped; the others are gathered into contiguous lines first.
fn envelope_pass(mut block: ArrayViewMut3<'_, f32>, step: f64) {
    let (len, _, width) = block.dim();
    let mut active = vec![false; width];
    for plane in block.outer_iter() {
        let plane = plane.index_axis_move(Axis(0), 0);
        let plane = plane.as_slice().expect("rows are contiguous");
        for (a, &v) in active.iter_mut().zip(plane) {
            *a |= v != 0.0;
        }
    }
    let columns: Vec<usize> = (0..width).filter(|&x| active[x]).collect();
    if columns.is_empty() {
        return;
    }
    let mut tile = vec![0f32; len * columns.len()];
    for (p, plane) in block.outer_iter().enumerate() {
        let plane = plane.index_axis_move(Axis(0), 0);
        let plane = plane.as_slice().expect("rows are contiguous");
        for (j, &x) in columns.iter().enumerate() {
            tile[j * len + p] = plane[x];
        }
    }
    let mut envelope = Envelope::with_capacity(len);
    for line in tile.chunks_exact_mut(len) {
        envelope.transform(line, step);
    }
    for (p, plane) in block.outer_iter_mut().enumerate() {
        let mut plane = plane.index_axis_move(Axis(0), 0);
        let plane = plane.as_slice_mut().expect("rows are contiguous");
        for (j, &x) in columns.iter().enumerate() {
            plane[x] = tile[j * len + p];
        }
    }
}

/// Scratch of the lower envelope of parabolas `(x − x_q)² + f(q)` (Felzenszwalb &
/// Huttenlocher): the parabolas kept, their minima and the boundaries between them.
struct Envelope {
    sites: Vec<f64>,
    minima: Vec<f64>,
    bounds: Vec<f64>,
}

impl Envelope {
    fn with_capacity(n: usize) -> Self {
        Envelope {
            sites: Vec::with_capacity(n),
            minima: Vec::with_capacity(n),
            bounds: Vec::with_capacity(n + 1),
        }
    }

    /// Replaces `f` by `d(p) = min_q (x_p − x_q)² + f(q)`, `x_p = p · step`.
    ///
    /// Zeros stay zeros, and inside a run of zeros only its two ends can be nearest to a voxel
    /// outside the run: the interior of such runs adds no parabola.
    fn transform(&mut self, f: &mut [f32], step: f64) {
        self.sites.clear();
        self.minima.clear();
        self.bounds.clear();
        let n = f.len();
        for (q, &fq) in f.iter().enumerate() {
            let interior_zero =
                fq == 0.0 && q > 0 && q + 1 < n && f[q - 1] == 0.0 && f[q + 1] == 0.0;
            if !fq.is_finite() || interior_zero {
                continue;
            }
            let (xq, fq) = (q as f64 * step, fq as f64);
            let mut bound = f64::NEG_INFINITY;
            while let (Some(&xr), Some(&fr)) = (self.sites.last(), self.minima.last()) {
                bound = ((fq + xq * xq) - (fr + xr * xr)) / (2.0 * (xq - xr));
                let last_bound = self.bounds[self.bounds.len() - 1];
                if bound <= last_bound {
                    self.sites.pop();
                    self.minima.pop();
                    self.bounds.pop();
                    bound = f64::NEG_INFINITY;
                } else {
                    break;
                }
            }
            self.sites.push(xq);
            self.minima.push(fq);
            self.bounds.push(bound);
        }
        if self.sites.is_empty() {
            return;
        }
        let mut k = 0;
        for (p, out) in f.iter_mut().enumerate() {
            let xp = p as f64 * step;
            while k + 1 < self.sites.len() && self.bounds[k + 1] < xp {
                k += 1;
            }
            if *out != 0.0 {
                let dx = xp - self.sites[k];
                *out = (dx * dx + self.minima[k]) as f32;
            }
        }
    }
}
