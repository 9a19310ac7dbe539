//! The distance weight map of the DWCE loss (Ronneberger et al. 2015; formulas §3).

use ndarray::{Array, Array3, ArrayView, Axis, Zip, s};

use crate::components::{Connectivity, label_components};
use crate::distance::squared_distance_to;
use crate::grid::{Grid, Label, active_axes, volume_spacing};
use crate::{MorphologyError, Result};

/// Settings of the DWCE weight map. Defaults: `w0 = 10`, `σ = 5`, class balancing on,
/// objects 26-connected (8 in 2D).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DwceSpec {
    /// Weight of the separation term.
    pub w0: f64,
    /// Width of the separation term, in the units of the spacing (voxels without one).
    pub sigma: f64,
    /// Weight classes by inverse frequency; otherwise every class weighs 1.
    pub class_balance: bool,
    /// Which voxels of one class form one object.
    pub connectivity: Connectivity,
}

impl Default for DwceSpec {
    fn default() -> Self {
        DwceSpec {
            w0: 10.0,
            sigma: 5.0,
            class_balance: true,
            connectivity: Connectivity::Corners,
        }
    }
}

/// Where the separation term is dropped: `exp(−R²/(2σ²)) = 1e-8` for `R` in units of σ.
const CUTOFF_SIGMAS: f64 = 6.069_5;

/// The DWCE weight map `m_v = w_c(y_v) + w0 · exp(−(d1_v + d2_v)² / (2σ²))`.
///
/// * `w_c`: inverse class frequency scaled so that `Σ_v w_c(y_v) = |V|`, that is
///   `w_c = |V| / (K' · n_c)` with `n_c` the voxels of class `c` and `K'` the classes present
///   (1 for every class without `class_balance`).
/// * `d1`, `d2`: Euclidean distances (units of `spacing`) to the nearest and second-nearest
///   object, the objects being the connected components of every foreground class; with
///   fewer than two objects the second term is 0.
///
/// Distances are computed within `6.07 σ` of each object's bounding box only: the term left
/// out beyond it is below `w0 · 1e-8`.
pub fn dwce_weight_map<L: Label, D: Grid>(
    labels: ArrayView<'_, L, D>,
    spacing: Option<&[f64]>,
    spec: &DwceSpec,
) -> Result<Array<f32, D>> {
    let spacing = volume_spacing::<D>(spacing)?;
    if !(spec.w0.is_finite() && spec.w0 >= 0.0) {
        return Err(MorphologyError::Parameter {
            name: "w0",
            expected: "finite and non-negative",
            value: spec.w0,
        });
    }
    if !(spec.sigma.is_finite() && spec.sigma > 0.0) {
        return Err(MorphologyError::Parameter {
            name: "sigma",
            expected: "finite and positive",
            value: spec.sigma,
        });
    }
    let volume = D::as_volume(labels).as_standard_layout().into_owned();
    let class_weight = class_weights(volume.iter().copied(), spec.class_balance)?;
    let mut weights = volume.mapv(|l| class_weight[l.to_i128() as usize]);

    let components = label_components(volume.view(), spec.connectivity);
    if components.count < 2 || spec.w0 == 0.0 {
        return Ok(D::from_volume(weights));
    }
    let objects = components.labels;
    let boxes = bounding_boxes(&objects, components.count);

    let cutoff = CUTOFF_SIGMAS * spec.sigma;
    let shape = objects.shape().to_vec();
    let mut nearest = Array3::from_elem(objects.raw_dim(), f32::INFINITY);
    let mut second = Array3::from_elem(objects.raw_dim(), f32::INFINITY);
    for (id, bounds) in boxes.iter().enumerate() {
        let id = id as u32 + 1;
        let mut roi = [(0usize, 0usize); 3];
        for axis in 0..3 {
            let (lo, hi) = bounds[axis];
            let margin = if active_axes::<D>().contains(&axis) {
                (cutoff / spacing[axis]).ceil() as usize
            } else {
                0
            };
            roi[axis] = (
                lo.saturating_sub(margin),
                (hi + 1 + margin).min(shape[axis]),
            );
        }
        let window = s![roi[0].0..roi[0].1, roi[1].0..roi[1].1, roi[2].0..roi[2].1];
        let squared = squared_distance_to(
            objects.slice(window),
            |o| o == id,
            spacing,
            active_axes::<D>(),
        );
        Zip::from(nearest.slice_mut(window))
            .and(second.slice_mut(window))
            .and(&squared)
            .par_for_each(|d1, d2, &sq| {
                let d = sq.sqrt();
                if d < *d1 {
                    *d2 = *d1;
                    *d1 = d;
                } else if d < *d2 {
                    *d2 = d;
                }
            });
    }
    let (w0, two_sigma2) = (spec.w0, 2.0 * spec.sigma * spec.sigma);
    Zip::from(&mut weights)
        .and(&nearest)
        .and(&second)
        .par_for_each(|w, &d1, &d2| {
            let sum = d1 as f64 + d2 as f64;
            if sum.is_finite() {
                *w += (w0 * (-(sum * sum) / two_sigma2).exp()) as f32;
            }
        });
    Ok(D::from_volume(weights))
}

/// Class weights indexed by label; errors on a label that is not a class index.
fn class_weights<L: Label>(labels: impl Iterator<Item = L>, balance: bool) -> Result<Vec<f32>> {
    const MAX_CLASSES: i128 = 1 << 16;
    let mut counts: Vec<usize> = Vec::new();
    let mut total = 0usize;
    for label in labels {
        let class = label.to_i128();
        if !(0..MAX_CLASSES).contains(&class) {
            return Err(MorphologyError::Label(class));
        }
        let class = class as usize;
        if class >= counts.len() {
            counts.resize(class + 1, 0);
        }
        counts[class] += 1;
        total += 1;
    }
    let present = counts.iter().filter(|&&n| n > 0).count();
    Ok(counts
        .iter()
        .map(|&n| match (balance, n) {
            (false, _) => 1.0,
            (true, 0) => 0.0,
            (true, n) => (total as f64 / (present as f64 * n as f64)) as f32,
        })
        .collect())
}

/// Inclusive `(first, last)` index per axis of every component `1..=count`.
fn bounding_boxes(objects: &Array3<u32>, count: usize) -> Vec<[(usize, usize); 3]> {
    let mut boxes = vec![[(usize::MAX, 0usize); 3]; count];
    for (z, plane) in objects.axis_iter(Axis(0)).enumerate() {
        for ((y, x), &id) in plane.indexed_iter() {
            if id == 0 {
                continue;
            }
            let b = &mut boxes[id as usize - 1];
            for (axis, i) in [z, y, x].into_iter().enumerate() {
                b[axis].0 = b[axis].0.min(i);
                b[axis].1 = b[axis].1.max(i);
            }
        }
    }
    boxes
}
