//! Resampling by affine: trilinear for images, nearest neighbour for labels, edges clamped
//! (scipy's `map_coordinates(..., mode="nearest")`).

use ndarray::{Array3, Array4, ArrayView3, Axis, Zip};
use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::volume::{Affine, Geometry, Image, LabelMap};

/// How values between voxel centres are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// The nearest voxel (`⌊x + ½⌋` per axis): for labels.
    Nearest,
    /// Trilinear: for images.
    Linear,
}

/// A map from output array indices `[z, y, x]` to input array indices: `in = M · out + t`,
/// rows `[m0, m1, m2, t]`.
pub type IndexMap = [[f64; 4]; 3];

/// Samples `data` at `map · [z, y, x]` for every voxel of an output of `shape`.
pub fn sample<T>(
    data: ArrayView3<T>,
    shape: [usize; 3],
    map: &IndexMap,
    interpolation: Interpolation,
) -> Array3<T>
where
    T: Copy + Default + Send + Sync + Into<f64> + FromF64,
{
    let (nz, ny, nx) = data.dim();
    let n = [nz, ny, nx];
    let mut out = Array3::<T>::from_elem(shape, T::default());
    let diagonal = (0..3).all(|a| (0..3).all(|b| a == b || map[a][b] == 0.0));
    if diagonal {
        // Axis-aligned (resampling to a spacing, zooms): the source index of each output index
        // is computed once per axis.
        let axis = |a: usize| -> Vec<(usize, usize, f64)> {
            (0..shape[a])
                .map(|o| {
                    let c = (map[a][a] * o as f64 + map[a][3]).clamp(0.0, (n[a] - 1) as f64);
                    let lo = c as usize; // c ≥ 0: truncation is the floor
                    (lo, (lo + 1).min(n[a] - 1), c - lo as f64)
                })
                .collect()
        };
        let (az, ay, ax) = (axis(0), axis(1), axis(2));
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(az.par_iter())
            .for_each(|(mut plane, &(z0, z1, fz))| {
                for (y, &(y0, y1, fy)) in ay.iter().enumerate() {
                    for (x, &(x0, x1, fx)) in ax.iter().enumerate() {
                        plane[[y, x]] = match interpolation {
                            Interpolation::Nearest => {
                                let pick =
                                    |lo: usize, hi: usize, f: f64| if f >= 0.5 { hi } else { lo };
                                data[[pick(z0, z1, fz), pick(y0, y1, fy), pick(x0, x1, fx)]]
                            }
                            Interpolation::Linear => {
                                let v = |z: usize, y: usize, x: usize| -> f64 {
                                    data[[z, y, x]].into()
                                };
                                let plane0 = (1.0 - fy)
                                    * ((1.0 - fx) * v(z0, y0, x0) + fx * v(z0, y0, x1))
                                    + fy * ((1.0 - fx) * v(z0, y1, x0) + fx * v(z0, y1, x1));
                                let plane1 = (1.0 - fy)
                                    * ((1.0 - fx) * v(z1, y0, x0) + fx * v(z1, y0, x1))
                                    + fy * ((1.0 - fx) * v(z1, y1, x0) + fx * v(z1, y1, x1));
                                T::from_f64((1.0 - fz) * plane0 + fz * plane1)
                            }
                        };
                    }
                }
            });
        return out;
    }
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(z, mut plane)| {
            for y in 0..shape[1] {
                for x in 0..shape[2] {
                    let o = [z as f64, y as f64, x as f64];
                    let mut c = [0.0f64; 3];
                    for a in 0..3 {
                        let v = map[a][0] * o[0] + map[a][1] * o[1] + map[a][2] * o[2] + map[a][3];
                        c[a] = v.clamp(0.0, (n[a] - 1) as f64);
                    }
                    plane[[y, x]] = match interpolation {
                        Interpolation::Nearest => {
                            // c ≥ 0: truncation is the floor
                            let i = c.map(|v| (v + 0.5) as usize);
                            data[[i[0].min(nz - 1), i[1].min(ny - 1), i[2].min(nx - 1)]]
                        }
                        Interpolation::Linear => {
                            let lo = c.map(|v| v as usize);
                            let f = [
                                c[0] - lo[0] as f64,
                                c[1] - lo[1] as f64,
                                c[2] - lo[2] as f64,
                            ];
                            let hi = [
                                (lo[0] + 1).min(nz - 1),
                                (lo[1] + 1).min(ny - 1),
                                (lo[2] + 1).min(nx - 1),
                            ];
                            let mut acc = 0.0f64;
                            for (dz, wz) in [(lo[0], 1.0 - f[0]), (hi[0], f[0])] {
                                for (dy, wy) in [(lo[1], 1.0 - f[1]), (hi[1], f[1])] {
                                    for (dx, wx) in [(lo[2], 1.0 - f[2]), (hi[2], f[2])] {
                                        let w = wz * wy * wx;
                                        if w != 0.0 {
                                            acc += w * data[[dz, dy, dx]].into();
                                        }
                                    }
                                }
                            }
                            T::from_f64(acc)
                        }
                    };
                }
            }
        });
    out
}

/// Conversion back from the interpolation's f64.
pub trait FromF64 {
    /// The value nearest to `v`.
    fn from_f64(v: f64) -> Self;
}

impl FromF64 for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl FromF64 for u8 {
    fn from_f64(v: f64) -> Self {
        v.round().clamp(0.0, 255.0) as u8
    }
}

/// The most voxels along one axis a resampled grid may have (NIfTI-1's limit).
pub const MAX_SIDE: usize = 32767;

/// The most voxels a resampled grid may have (8 GiB of f32 per channel).
pub const MAX_VOXELS: usize = 1 << 31;

/// The output grid for `spacing` `[z, y, x]` mm: same first voxel centre and axis directions,
/// `round(n · s_old / s_new)` voxels per axis (ties to even, as numpy; at least one); and the
/// index map onto the input.
pub fn spacing_grid(geometry: &Geometry, spacing: [f64; 3]) -> Result<(Geometry, IndexMap)> {
    if spacing.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
        return Err(DataError::Invalid(format!(
            "target spacing {spacing:?} must be finite and positive"
        )));
    }
    let old = geometry.spacing();
    let sides: [f64; 3] = std::array::from_fn(|a| {
        (geometry.shape()[a] as f64 * old[a] / spacing[a])
            .round_ties_even()
            .max(1.0)
    });
    let voxels: f64 = sides.iter().product();
    if sides.iter().any(|&n| n > MAX_SIDE as f64) || voxels > MAX_VOXELS as f64 {
        return Err(DataError::Invalid(format!(
            "resampling {:?} voxels of {old:?} mm to {spacing:?} mm would give {sides:?} voxels \
             (at most {MAX_SIDE} per axis and 2^31 in all): a target spacing far finer than the \
             data's, or a wrong voxel size in a header",
            geometry.shape()
        )));
    }
    let shape: [usize; 3] = sides.map(|n| n as usize);
    let mut affine = *geometry.affine();
    // array axis a is voxel axis 2 − a: scale that column
    for a in 0..3 {
        let col = 2 - a;
        let ratio = spacing[a] / old[a];
        for row in affine.iter_mut().take(3) {
            row[col] *= ratio;
        }
    }
    let mut map = [[0.0; 4]; 3];
    for a in 0..3 {
        map[a][a] = spacing[a] / old[a];
    }
    Ok((geometry.derive(shape, affine), map))
}

/// The index map from `target`'s array grid onto `source`'s, through world coordinates.
pub fn geometry_map(source: &Geometry, target: &Geometry) -> Result<IndexMap> {
    let inv = invert(source.affine())
        .ok_or_else(|| DataError::Invalid("the source affine is singular".into()))?;
    let t = target.affine();
    // voxel (ijk) map: inv · t
    let mut m = [[0.0f64; 4]; 4];
    for r in 0..4 {
        for c in 0..4 {
            m[r][c] = (0..4).map(|k| inv[r][k] * t[k][c]).sum();
        }
    }
    // array axis a is voxel axis 2 − a
    let mut map = [[0.0; 4]; 3];
    for a in 0..3 {
        for b in 0..3 {
            map[a][b] = m[2 - a][2 - b];
        }
        map[a][3] = m[2 - a][3];
    }
    Ok(map)
}

/// The image resampled (trilinear) to `spacing` `[z, y, x]` mm.
pub fn resample_image(image: &Image, spacing: [f64; 3]) -> Result<Image> {
    let (geometry, map) = spacing_grid(&image.geometry, spacing)?;
    Ok(Image {
        data: sample_channels(&image.data, geometry.shape(), &map),
        geometry,
    })
}

/// The label map resampled (nearest neighbour) to `spacing` `[z, y, x]` mm.
pub fn resample_label(label: &LabelMap, spacing: [f64; 3]) -> Result<LabelMap> {
    let (geometry, map) = spacing_grid(&label.geometry, spacing)?;
    Ok(LabelMap {
        data: sample(
            label.data.view(),
            geometry.shape(),
            &map,
            Interpolation::Nearest,
        ),
        geometry,
    })
}

/// The image resampled (trilinear) onto `target`'s grid, through both affines.
pub fn resample_image_to(image: &Image, target: &Geometry) -> Result<Image> {
    let map = geometry_map(&image.geometry, target)?;
    Ok(Image {
        data: sample_channels(&image.data, target.shape(), &map),
        geometry: target.clone(),
    })
}

/// The label map resampled (nearest) onto `target`'s grid: how predictions return to the input's
/// exact geometry.
pub fn resample_label_to(label: &LabelMap, target: &Geometry) -> Result<LabelMap> {
    let map = geometry_map(&label.geometry, target)?;
    Ok(LabelMap {
        data: sample(
            label.data.view(),
            target.shape(),
            &map,
            Interpolation::Nearest,
        ),
        geometry: target.clone(),
    })
}

fn sample_channels(data: &Array4<f32>, shape: [usize; 3], map: &IndexMap) -> Array4<f32> {
    let c = data.dim().0;
    let mut out = Array4::<f32>::zeros((c, shape[0], shape[1], shape[2]));
    Zip::from(out.outer_iter_mut())
        .and(data.outer_iter())
        .for_each(|mut o, i| o.assign(&sample(i, shape, map, Interpolation::Linear)));
    out
}

/// The inverse of an affine (general 4×4, Gauss–Jordan with partial pivoting).
pub(crate) fn invert(a: &Affine) -> Option<Affine> {
    let mut m = *a;
    let mut inv = crate::volume::identity();
    for col in 0..4 {
        let pivot = (col..4).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        inv.swap(col, pivot);
        let p = m[col][col];
        for k in 0..4 {
            m[col][k] /= p;
            inv[col][k] /= p;
        }
        for row in 0..4 {
            if row != col {
                let f = m[row][col];
                for k in 0..4 {
                    m[row][k] -= f * m[col][k];
                    inv[row][k] -= f * inv[col][k];
                }
            }
        }
    }
    Some(inv)
}
