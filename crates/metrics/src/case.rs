//! Per-case, per-class metrics (formulas §5).

use cwseg_morphology::{Border, Element, ErosionSpec, Grid, Label, contour, edt};
use ndarray::{Array3, ArrayView, ArrayView3, Axis, s};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::classes::{ClassSet, ClassTable};
use crate::quantile::percentile;
use crate::{MetricsError, Result};

/// How a class fared in a case; every report shows it beside the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Present in the label and predicted with some overlap.
    Ok,
    /// Absent from both label and prediction: every metric is NaN (the class is skipped).
    Empty,
    /// Present in the label, DSC = 0 (missed, or predicted elsewhere): a failure in the
    /// paper's sense, never dropped silently.
    Failure,
    /// Absent from the label but predicted: DSC 0, distances infinite.
    Spurious,
}

/// The metrics of one class in one case. Distances in mm.
///
/// | metric | definition | when a mask is empty |
/// |---|---|---|
/// | `dice` | `2|P∩G| / (|P|+|G|)` | `|G| = 0`: NaN if `|P| = 0`, else 0 |
/// | `iou` | `|P∩G| / |P∪G|` | NaN if both empty |
/// | `precision`, `recall` | `|P∩G|/|P|`, `|P∩G|/|G|` | NaN on a zero denominator |
/// | `hausdorff` | max over both directions of the largest surface distance | `+∞` if one is empty, NaN if both |
/// | `hausdorff95` | max over both directions of the 95th percentile (linear interpolation) | idem |
/// | `assd` | mean of the distances of both directions together | idem |
/// | `nsd` | `(#{∂P within τ of ∂G} + #{∂G within τ of ∂P}) / (|∂P|+|∂G|)` | 0 if one is empty, NaN if both |
///
/// Surfaces are the inner boundary voxels `S ∧ ¬erode(S)` (face-connected cross, outside the
/// array is background), as MONAI's `get_mask_edges`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Dice similarity coefficient.
    pub dice: f64,
    /// Intersection over union (Jaccard).
    pub iou: f64,
    /// `|P∩G| / |P|`.
    pub precision: f64,
    /// `|P∩G| / |G|` (sensitivity).
    pub recall: f64,
    /// `(|P| − |G|) · voxel volume`, mm³.
    pub volume_difference_mm3: f64,
    /// `(|P| − |G|) / |G|` (NaN when `|G| = 0`).
    pub relative_volume_difference: f64,
    /// Hausdorff distance (maximum), mm.
    pub hausdorff: f64,
    /// 95th-percentile Hausdorff distance, mm.
    pub hausdorff95: f64,
    /// Average symmetric surface distance, mm.
    pub assd: f64,
    /// Normalised surface dice at the class's tolerance.
    pub nsd: f64,
    /// Predicted voxels `|P|`.
    pub prediction_voxels: u64,
    /// Label voxels `|G|`.
    pub label_voxels: u64,
    /// How the class fared.
    pub status: Status,
}

/// The metrics of every class of one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseMetrics {
    /// The case's name.
    pub case: String,
    /// One entry per class set, in the configuration's order.
    pub classes: Vec<(String, ClassMetrics)>,
}

/// Counts and the bounding box of `P ∪ G` of one class.
#[derive(Debug, Clone, Copy)]
struct Overlap {
    tp: u64,
    fp: u64,
    fn_: u64,
    lo: [usize; 3],
    hi: [usize; 3],
}

impl Default for Overlap {
    fn default() -> Self {
        Overlap {
            tp: 0,
            fp: 0,
            fn_: 0,
            lo: [usize::MAX; 3],
            hi: [0; 3],
        }
    }
}

impl Overlap {
    fn merge(mut self, other: &Overlap) -> Overlap {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
        for a in 0..3 {
            self.lo[a] = self.lo[a].min(other.lo[a]);
            self.hi[a] = self.hi[a].max(other.hi[a]);
        }
        self
    }
}

/// Evaluates one case: every class set of `classes` in `prediction` against `label`, with
/// the voxel `spacing` in mm (one entry per axis, `[z, y, x]` or `[y, x]`).
///
/// Labels that no class set names count as background for every class.
pub fn evaluate_case<L: Label, D: Grid>(
    case: &str,
    prediction: ArrayView<'_, L, D>,
    label: ArrayView<'_, L, D>,
    spacing: &[f64],
    classes: &[ClassSet],
) -> Result<CaseMetrics> {
    if prediction.shape() != label.shape() {
        return Err(MetricsError::Shape {
            prediction: prediction.shape().to_vec(),
            label: label.shape().to_vec(),
        });
    }
    // distances are computed in f32: a voxel over a kilometre would overflow them
    if spacing.len() != D::RANK
        || spacing
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0 && *s <= 1e6))
    {
        return Err(MetricsError::Spacing {
            spacing: spacing.to_vec(),
            rank: D::RANK,
        });
    }
    if classes.is_empty() {
        return Err(MetricsError::NoClasses);
    }
    let prediction = D::as_volume(prediction).as_standard_layout().into_owned();
    let label = D::as_volume(label).as_standard_layout().into_owned();
    let voxel_volume: f64 = spacing.iter().product();
    // one pass over the volumes per 64 class sets (a bit each in the label table)
    let mut results = Vec::with_capacity(classes.len());
    for chunk in classes.chunks(ClassTable::CAPACITY) {
        let table = ClassTable::new(chunk)?;
        let overlaps = overlaps(prediction.view(), label.view(), &table, chunk.len());
        let chunk: Result<Vec<(String, ClassMetrics)>> = chunk
            .par_iter()
            .enumerate()
            .map(|(c, class)| {
                let metrics = class_metrics(
                    &overlaps[c],
                    c,
                    &table,
                    prediction.view(),
                    label.view(),
                    spacing,
                    voxel_volume,
                    class.nsd_tolerance_mm,
                )?;
                Ok((class.name.clone(), metrics))
            })
            .collect();
        results.extend(chunk?);
    }
    Ok(CaseMetrics {
        case: case.to_string(),
        classes: results,
    })
}

/// One parallel pass over both volumes: TP/FP/FN and the bounding box of `P ∪ G` per class.
fn overlaps<L: Label>(
    prediction: ArrayView3<'_, L>,
    label: ArrayView3<'_, L>,
    table: &ClassTable,
    classes: usize,
) -> Vec<Overlap> {
    let width = prediction.dim().2;
    (0..prediction.dim().0)
        .into_par_iter()
        .fold(
            || vec![Overlap::default(); classes],
            |mut acc, z| {
                let (p, g) = (
                    prediction.index_axis(Axis(0), z),
                    label.index_axis(Axis(0), z),
                );
                let (p, g) = (
                    p.as_slice().expect("standard layout"),
                    g.as_slice().expect("standard layout"),
                );
                for (i, (&pv, &gv)) in p.iter().zip(g).enumerate() {
                    let (bp, bg) = (table.bits(pv.to_i128()), table.bits(gv.to_i128()));
                    let mut union = bp | bg;
                    if union == 0 {
                        continue;
                    }
                    let (y, x) = (i / width, i % width);
                    while union != 0 {
                        let c = union.trailing_zeros() as usize;
                        let bit = 1u64 << c;
                        union &= !bit;
                        let o = &mut acc[c];
                        match (bp & bit != 0, bg & bit != 0) {
                            (true, true) => o.tp += 1,
                            (true, false) => o.fp += 1,
                            _ => o.fn_ += 1,
                        }
                        for (a, i) in [z, y, x].into_iter().enumerate() {
                            o.lo[a] = o.lo[a].min(i);
                            o.hi[a] = o.hi[a].max(i);
                        }
                    }
                }
                acc
            },
        )
        .reduce(
            || vec![Overlap::default(); classes],
            |a, b| a.iter().zip(&b).map(|(a, b)| a.merge(b)).collect(),
        )
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        f64::NAN
    } else {
        num as f64 / den as f64
    }
}

#[allow(clippy::too_many_arguments)]
fn class_metrics<L: Label>(
    o: &Overlap,
    class: usize,
    table: &ClassTable,
    prediction: ArrayView3<'_, L>,
    label: ArrayView3<'_, L>,
    spacing: &[f64],
    voxel_volume: f64,
    tolerance: f64,
) -> Result<ClassMetrics> {
    let (p, g) = (o.tp + o.fp, o.tp + o.fn_);
    let status = match (p, g) {
        (0, 0) => Status::Empty,
        (_, 0) => Status::Spurious,
        _ if o.tp == 0 => Status::Failure,
        _ => Status::Ok,
    };
    let dice = if p + g == 0 {
        f64::NAN
    } else {
        2.0 * o.tp as f64 / (p + g) as f64
    };
    let mut metrics = ClassMetrics {
        dice,
        iou: ratio(o.tp, o.tp + o.fp + o.fn_),
        precision: ratio(o.tp, p),
        recall: ratio(o.tp, g),
        volume_difference_mm3: (p as f64 - g as f64) * voxel_volume,
        relative_volume_difference: if g == 0 {
            f64::NAN
        } else {
            (p as f64 - g as f64) / g as f64
        },
        hausdorff: f64::NAN,
        hausdorff95: f64::NAN,
        assd: f64::NAN,
        nsd: f64::NAN,
        prediction_voxels: p,
        label_voxels: g,
        status,
    };
    match (p, g) {
        (0, 0) => {}
        (0, _) | (_, 0) => {
            metrics.hausdorff = f64::INFINITY;
            metrics.hausdorff95 = f64::INFINITY;
            metrics.assd = f64::INFINITY;
            metrics.nsd = 0.0;
        }
        _ => {
            let (mut to_label, mut to_prediction) =
                surface_distances(o, class, table, prediction, label, spacing)?;
            let hd = |d: &[f64]| d.iter().copied().fold(0.0, f64::max);
            metrics.hausdorff = hd(&to_label).max(hd(&to_prediction));
            let n = (to_label.len() + to_prediction.len()) as f64;
            let total: f64 = to_label.iter().chain(&to_prediction).sum();
            metrics.assd = total / n;
            let within = to_label
                .iter()
                .chain(&to_prediction)
                .filter(|&&d| d <= tolerance)
                .count();
            metrics.nsd = within as f64 / n;
            metrics.hausdorff95 =
                percentile(&mut to_label, 95.0).max(percentile(&mut to_prediction, 95.0));
        }
    }
    Ok(metrics)
}

/// Distances (mm) from every surface voxel of the prediction to the label's surface, and
/// from the label's surface to the prediction's, on the bounding box of `P ∪ G` only: both
/// surfaces lie inside it, so the distance transforms restricted to it are exact.
fn surface_distances<L: Label>(
    o: &Overlap,
    class: usize,
    table: &ClassTable,
    prediction: ArrayView3<'_, L>,
    label: ArrayView3<'_, L>,
    spacing: &[f64],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let window = s![o.lo[0]..=o.hi[0], o.lo[1]..=o.hi[1], o.lo[2]..=o.hi[2]];
    let bit = 1u64 << class;
    let member = |l: &L| table.bits(l.to_i128()) & bit != 0;
    let p = prediction.slice(window).map(member);
    let g = label.slice(window).map(member);
    let rank = spacing.len();
    let (p_edge, g_edge) = (edges(&p, rank)?, edges(&g, rank)?);
    let to_g = distance_to(&g_edge, spacing)?;
    let to_p = distance_to(&p_edge, spacing)?;
    let pick = |edge: &Array3<bool>, d: &Array3<f32>| -> Vec<f64> {
        edge.iter()
            .zip(d.iter())
            .filter(|(e, _)| **e)
            .map(|(_, &d)| d as f64)
            .collect()
    };
    Ok((pick(&p_edge, &to_g), pick(&g_edge, &to_p)))
}

/// Inner boundary `S ∧ ¬erode(S)` with the face cross, in 2D for images.
fn edges(mask: &Array3<bool>, rank: usize) -> Result<Array3<bool>> {
    let spec = ErosionSpec {
        element: Element::Cross,
        iterations: 1,
        border: Border::Background,
    };
    Ok(if rank == 2 {
        contour(mask.index_axis(Axis(0), 0), &spec)?.insert_axis(Axis(0))
    } else {
        contour(mask.view(), &spec)?
    })
}

/// Distance (mm) from every voxel to the nearest set voxel of `surface`.
fn distance_to(surface: &Array3<bool>, spacing: &[f64]) -> Result<Array3<f32>> {
    let outside = surface.mapv(|s| !s);
    Ok(if spacing.len() == 2 {
        edt(outside.index_axis(Axis(0), 0), Some(spacing))?.insert_axis(Axis(0))
    } else {
        edt(outside.view(), Some(spacing))?
    })
}
