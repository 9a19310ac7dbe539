//! What a loss compares the logits with: labels, and the maps some losses need.

use candle_core::{DType, Device, Tensor};
use cwseg_morphology::{Border, ContourSpec, DwceSpec, Element, ErosionSpec};
use ndarray::{Array2, Array3, ArrayView3, Axis};
use serde::{Deserialize, Serialize};

use crate::regions::Regions;
use crate::{LossError, Result};

/// Which implementation of the fused reductions runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels: parallel CPU kernels on the CPU, a CUDA kernel pair on CUDA (in
    /// builds with the `cuda` feature), candle operations elsewhere.
    #[default]
    Auto,
    /// Candle operations everywhere (for tests and comparisons).
    Composite,
}

/// The target of a loss: labels `(N, D, H, W)` (class indices; 2D data has `D = 1`) and,
/// optionally, maps precomputed on the CPU by the data pipeline. A map left out is computed
/// from the labels when a loss needs it: contour maps online on the labels' device, DWCE weights,
/// signed distances and tubed skeletons on the CPU with `cwseg-morphology`.
#[derive(Debug, Clone)]
pub struct Target {
    labels: Tensor,
    edges: Option<Tensor>,
    dwce_weights: Option<Tensor>,
    signed_distance: Option<Tensor>,
    skeleton: Option<Tensor>,
    regions: Option<Regions>,
    kernels: Kernels,
}

impl Target {
    /// A target from labels `(N, D, H, W)`, any integer dtype.
    pub fn new(labels: Tensor) -> Result<Self> {
        let labels = match labels.dtype() {
            DType::U32 => labels,
            DType::U8 | DType::I64 => labels.to_dtype(DType::I64)?,
            other => return Err(LossError::LabelType(other)),
        };
        if labels.rank() != 4 {
            return Err(LossError::Shape {
                logits: vec![],
                labels: labels.dims().to_vec(),
            });
        }
        Ok(Target {
            labels,
            edges: None,
            dwce_weights: None,
            signed_distance: None,
            skeleton: None,
            regions: None,
            kernels: Kernels::Auto,
        })
    }

    /// Chooses the implementation of the reductions (default: fused kernels on the CPU).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    pub(crate) fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Adds the edge map `E` (`(N, D, H, W)`, 1 where the eroding element placed at the voxel
    /// meets another label or, with a background border, leaves the array): the contour map of
    /// formulas §1 over every class, as [`edges_cpu`] computes it for the loss's contour settings.
    pub fn with_edges(mut self, edges: Tensor) -> Self {
        self.edges = Some(edges);
        self
    }

    /// Trains regions instead of classes ([`crate::regions`]): the logits are `(N, J, D, H, W)`,
    /// one sigmoid output per region, and every loss takes its region form; an edge map given
    /// with [`Target::with_edges`] is then `(N, J, D, H, W)`, region `j`'s own contour map.
    pub fn with_regions(mut self, regions: Regions) -> Self {
        self.regions = Some(regions);
        self
    }

    /// The regions, when the target trains regions.
    pub fn regions(&self) -> Option<&Regions> {
        self.regions.as_ref()
    }

    /// Adds the DWCE weight map `(N, D, H, W)`.
    pub fn with_dwce_weights(mut self, weights: Tensor) -> Self {
        self.dwce_weights = Some(weights);
        self
    }

    /// Adds the per-class signed distances `(N, K, D, H, W)` of the boundary loss.
    pub fn with_signed_distance(mut self, distance: Tensor) -> Self {
        self.signed_distance = Some(distance);
        self
    }

    /// Adds Skeleton Recall's tubed skeleton `(N, D, H, W)`: class indices (u8, u32 or i64), 0
    /// off the tube, as [`skeleton_cpu`] makes it from the labels (a data pipeline may make it
    /// on a patch widened by a halo: `cwseg-data`'s `PatchMaps::skeleton`).
    pub fn with_skeleton(mut self, skeleton: Tensor) -> Self {
        self.skeleton = Some(skeleton);
        self
    }

    /// The labels.
    pub fn labels(&self) -> &Tensor {
        &self.labels
    }

    /// Labels as `u32` after checking them against the logits: shape and range `0..K`.
    pub(crate) fn checked_labels(&self, logits: &Tensor) -> Result<Tensor> {
        let (l, y) = (logits.dims(), self.labels.dims());
        if l.len() != 5 || l[0] != y[0] || l[2..] != y[1..] {
            return Err(LossError::Shape {
                logits: l.to_vec(),
                labels: y.to_vec(),
            });
        }
        let classes = match &self.regions {
            Some(regions) if regions.len() != l[1] => {
                return Err(LossError::Config {
                    loss: "regions",
                    what: format!(
                        "{} regions, but the logits have {} channels",
                        regions.len(),
                        l[1]
                    ),
                });
            }
            Some(regions) => regions.classes(),
            None => l[1],
        };
        let labels = self.labels.to_device(logits.device())?;
        if labels.dtype() == DType::I64 {
            // checked before the narrowing to u32, which would wrap 2^32 + 1 to 1
            let min = labels.min_all()?.to_scalar::<i64>()?;
            let max = labels.max_all()?.to_scalar::<i64>()?;
            if min < 0 || max as u64 >= classes as u64 {
                return Err(LossError::Label {
                    classes,
                    found: if min < 0 { min } else { max },
                });
            }
        }
        let labels = labels.to_dtype(DType::U32)?;
        let max = labels.max_all()?.to_scalar::<u32>()?;
        if max as usize >= classes {
            return Err(LossError::Label {
                classes,
                found: max as i64,
            });
        }
        Ok(labels)
    }

    fn map(
        &self,
        map: &Option<Tensor>,
        name: &'static str,
        expected: &[usize],
        like: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(map) = map else { return Ok(None) };
        if map.dims() != expected {
            return Err(LossError::MapShape {
                map: name,
                got: map.dims().to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(Some(map.to_device(like.device())?.to_dtype(like.dtype())?))
    }

    /// The edge map for `contour`, given or computed online.
    pub(crate) fn edges(
        &self,
        labels: &Tensor,
        contour: &ContourConfig,
        like: &Tensor,
        on_cpu: bool,
    ) -> Result<Tensor> {
        if let Some(regions) = &self.regions {
            let mut expected = labels.dims().to_vec();
            expected.insert(1, regions.len());
            return match self.map(&self.edges, "region edge", &expected, like)? {
                Some(edges) => Ok(edges),
                None => Ok(regions
                    .edges(labels, contour, on_cpu)?
                    .to_device(like.device())?
                    .to_dtype(like.dtype())?),
            };
        }
        match self.map(&self.edges, "edge", labels.dims(), like)? {
            Some(edges) => Ok(edges),
            None if on_cpu => Ok(edges_cpu(labels, contour)?.to_dtype(like.dtype())?),
            None => Ok(edges_online(labels, contour)?.to_dtype(like.dtype())?),
        }
    }

    pub(crate) fn dwce_weights(
        &self,
        labels: &Tensor,
        spec: &DwceSpec,
        like: &Tensor,
    ) -> Result<Tensor> {
        match self.map(&self.dwce_weights, "DWCE weight", labels.dims(), like)? {
            Some(w) => Ok(w),
            None => Ok(dwce_weights_cpu(labels, spec)?
                .to_device(like.device())?
                .to_dtype(like.dtype())?),
        }
    }

    /// The tubed skeleton as `u32` class indices on the labels' device: given (checked for
    /// shape and range `0..classes`) or computed with [`skeleton_cpu`].
    pub(crate) fn skeleton(&self, labels: &Tensor, classes: usize) -> Result<Tensor> {
        let Some(map) = &self.skeleton else {
            return Ok(skeleton_cpu(labels)?.to_device(labels.device())?);
        };
        if map.dims() != labels.dims() {
            return Err(LossError::MapShape {
                map: "skeleton",
                got: map.dims().to_vec(),
                expected: labels.dims().to_vec(),
            });
        }
        let map = match map.dtype() {
            DType::U8 | DType::U32 | DType::I64 => map.to_device(labels.device())?,
            other => return Err(LossError::LabelType(other)),
        };
        let (min, max) = (
            map.to_dtype(DType::I64)?.min_all()?.to_scalar::<i64>()?,
            map.to_dtype(DType::I64)?.max_all()?.to_scalar::<i64>()?,
        );
        if min < 0 || max as u64 >= classes as u64 {
            return Err(LossError::Label {
                classes,
                found: if min < 0 { min } else { max },
            });
        }
        Ok(map.to_dtype(DType::U32)?)
    }

    pub(crate) fn signed_distance(
        &self,
        labels: &Tensor,
        classes: usize,
        like: &Tensor,
    ) -> Result<Tensor> {
        let mut expected = labels.dims().to_vec();
        expected.insert(1, classes);
        match self.map(&self.signed_distance, "signed distance", &expected, like)? {
            Some(d) => Ok(d),
            None => Ok(signed_distance_cpu(labels, classes)?
                .to_device(like.device())?
                .to_dtype(like.dtype())?),
        }
    }
}

/// How contours are made (formulas §1): `iterations` erosions by a cube of side `kernel` (or the
/// cross), with a border. Default: the paper's cube 3, 6 iterations, background border. On an
/// anisotropic grid `iterations_per_axis = [n_z, n_y, n_x]` keeps the band's millimetres per
/// axis: the cube's `n_a` erosions along axis `a` (one erosion by the box of sides
/// `n_a (k − 1) + 1`; odd `k` only), in place of `iterations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContourConfig {
    /// Side `k` of the cube (ignored for the cross).
    pub kernel: usize,
    /// Number of erosions `n`.
    pub iterations: usize,
    /// `cube` or `cross`.
    pub element: ElementKind,
    /// `background` or `replicate`.
    pub border: BorderKind,
    /// Erosions per axis `[z, y, x]` (cube, odd `kernel`), in place of `iterations`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iterations_per_axis: Option<[usize; 3]>,
}

/// The structuring element's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementKind {
    /// Cube of side `kernel`.
    Cube,
    /// Face cross.
    Cross,
}

/// What lies outside the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BorderKind {
    /// Outside is another label: the volume's edge is contour.
    Background,
    /// Outside copies the edge: crop edges are never contour (for random patches).
    Replicate,
}

impl Default for ContourConfig {
    fn default() -> Self {
        ContourConfig {
            kernel: 3,
            iterations: 6,
            element: ElementKind::Cube,
            border: BorderKind::Background,
            iterations_per_axis: None,
        }
    }
}

impl ContourConfig {
    /// The morphology crate's settings.
    pub fn erosion(&self) -> ErosionSpec {
        let (element, iterations) = match (self.element, self.iterations_per_axis) {
            (ElementKind::Cube, Some(n)) => (
                Element::Cuboid(n.map(|n| n * (self.kernel.max(1) - 1) + 1)),
                1,
            ),
            (ElementKind::Cube, None) => (Element::Cube(self.kernel), self.iterations),
            (ElementKind::Cross, _) => (Element::Cross, self.iterations),
        };
        ErosionSpec {
            element,
            iterations,
            border: match self.border {
                BorderKind::Background => Border::Background,
                BorderKind::Replicate => Border::Replicate,
            },
        }
    }

    /// The erosions along each axis `[z, y, x]`.
    pub fn axis_iterations(&self) -> [usize; 3] {
        self.iterations_per_axis.unwrap_or([self.iterations; 3])
    }

    pub(crate) fn validate(&self, loss: &'static str) -> Result<()> {
        if let Some(n) = self.iterations_per_axis
            && (n.contains(&0)
                || self.element != ElementKind::Cube
                || self.kernel.is_multiple_of(2))
        {
            return Err(LossError::Config {
                loss,
                what: format!(
                    "contour.iterations_per_axis = {n:?}: each ≥ 1, with the cube of an odd \
                     kernel (kernel {}, element {:?})",
                    self.kernel, self.element
                ),
            });
        }
        if self.iterations == 0 || (self.element == ElementKind::Cube && self.kernel == 0) {
            return Err(LossError::Config {
                loss,
                what: format!(
                    "contour needs kernel ≥ 1 and iterations ≥ 1, got kernel {} and iterations {}",
                    self.kernel, self.iterations
                ),
            });
        }
        Ok(())
    }
}

impl Regions {
    /// The contour maps `C^j` `(N, J, D, H, W)` (u8) of every region's mask, background counted:
    /// on the CPU with `cwseg-morphology`, elsewhere online (bit-identical).
    pub fn edges(&self, labels: &Tensor, contour: &ContourConfig, on_cpu: bool) -> Result<Tensor> {
        let maps = (0..self.len())
            .map(|j| {
                let mask = self.mask(labels, j)?;
                if on_cpu {
                    edges_cpu(&mask, contour)
                } else {
                    Ok(edges_online(&mask, contour)?.to_dtype(DType::U8)?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&maps, 1)?)
    }
}

/// One-hot `(N, K, D, H, W)` of `u32` labels `(N, D, H, W)`, in `dtype`.
pub(crate) fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let ids =
        Tensor::arange(0u32, classes as u32, labels.device())?.reshape((1, classes, 1, 1, 1))?;
    Ok(labels.unsqueeze(1)?.broadcast_eq(&ids)?.to_dtype(dtype)?)
}

/// The edge map `E` of `u32` labels `(N, D, H, W)`, with tensor operations on their device:
/// `E = 1` iff the box around a voxel is not uniform, from separable sliding minimum and
/// maximum of the labels (log-step doubling: ⌈log₂ L⌉ + 1 operations per axis for a window of
/// L voxels), or `n` cross steps. Equal, bit for bit, to [`edges_cpu`]. A volume with `D = 1`
/// is 2D: the depth axis is not eroded.
pub fn edges_online(labels: &Tensor, contour: &ContourConfig) -> Result<Tensor> {
    contour.validate("contour")?;
    let (_, depth, _, _) = labels.dims4()?;
    let axes: Vec<usize> = if depth == 1 {
        vec![2, 3]
    } else {
        vec![1, 2, 3]
    };
    let values = labels.to_dtype(DType::F32)?;
    // Outside the volume: a value no label has, for a background border.
    let breaks = contour.border == BorderKind::Background;
    let non_uniform = match contour.element {
        ElementKind::Cube => {
            let k = contour.kernel;
            let n = contour.axis_iterations();
            let mut low = values.clone();
            let mut high = values.clone();
            for &axis in &axes {
                let (back, forward) = (n[axis - 1] * (k / 2), n[axis - 1] * (k - 1 - k / 2));
                low = window_extreme(&low, axis, back, forward, breaks, Extreme::Min)?;
                high = window_extreme(&high, axis, back, forward, breaks, Extreme::Max)?;
            }
            low.ne(&high)?
        }
        ElementKind::Cross => {
            let mut low = values.clone();
            let mut high = values.clone();
            for _ in 0..contour.iterations {
                let (mut next_low, mut next_high) = (low.clone(), high.clone());
                for &axis in &axes {
                    next_low = next_low.minimum(&window_extreme(
                        &low,
                        axis,
                        1,
                        1,
                        breaks,
                        Extreme::Min,
                    )?)?;
                    next_high = next_high.maximum(&window_extreme(
                        &high,
                        axis,
                        1,
                        1,
                        breaks,
                        Extreme::Max,
                    )?)?;
                }
                (low, high) = (next_low, next_high);
            }
            low.ne(&high)?
        }
    };
    Ok(non_uniform.to_dtype(DType::U8)?)
}

#[derive(Clone, Copy)]
enum Extreme {
    Min,
    Max,
}

/// Sliding minimum (or maximum) over `[i − back, i + forward]` along `axis`; outside the
/// volume is −1 (or +∞) when `breaks`, else the edge value is replicated.
fn window_extreme(
    x: &Tensor,
    axis: usize,
    back: usize,
    forward: usize,
    breaks: bool,
    which: Extreme,
) -> Result<Tensor> {
    let len = back + forward + 1;
    if len == 1 {
        return Ok(x.clone());
    }
    let n = x.dim(axis)?;
    let padded = if breaks {
        let fill = match which {
            Extreme::Min => -1.0,
            Extreme::Max => f32::MAX as f64,
        };
        let pad = |size: usize| -> Result<Tensor> {
            let mut shape = x.dims().to_vec();
            shape[axis] = size;
            Ok(Tensor::full(fill as f32, shape, x.device())?)
        };
        Tensor::cat(&[&pad(back)?, x, &pad(forward)?], axis)?
    } else {
        x.pad_with_same(axis, back, forward)?
    };
    let combine = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        Ok(match which {
            Extreme::Min => a.minimum(b)?,
            Extreme::Max => a.maximum(b)?,
        })
    };
    // M_s[i] = extreme of padded[i .. i + s], for s = 1, 2, 4, … ≤ len.
    let mut span = 1;
    let mut m = padded;
    while span * 2 <= len {
        let size = m.dim(axis)? - span;
        m = combine(&m.narrow(axis, 0, size)?, &m.narrow(axis, span, size)?)?;
        span *= 2;
    }
    combine(&m.narrow(axis, 0, n)?, &m.narrow(axis, len - span, n)?)
}

/// Labels `(N, D, H, W)` as ndarray volumes on the CPU.
fn label_volumes(labels: &Tensor) -> Result<Vec<Array3<u32>>> {
    let (n, d, h, w) = labels.dims4()?;
    let flat = labels
        .to_device(&Device::Cpu)?
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    Ok(flat
        .chunks_exact(d * h * w)
        .take(n)
        .map(|c| Array3::from_shape_vec((d, h, w), c.to_vec()).expect("one value per voxel"))
        .collect())
}

fn stack(volumes: Vec<Vec<f32>>, shape: &[usize]) -> Result<Tensor> {
    let flat: Vec<f32> = volumes.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, shape, &Device::Cpu)?)
}

/// Runs a 3D map, or its 2D form on the single slice of a `D = 1` volume.
fn per_volume<T>(
    volume: &Array3<u32>,
    three: impl Fn(ArrayView3<'_, u32>) -> Result<Array3<T>>,
    two: impl Fn(ndarray::ArrayView2<'_, u32>) -> Result<Array2<T>>,
) -> Result<Array3<T>> {
    if volume.dim().0 == 1 {
        Ok(two(volume.index_axis(Axis(0), 0))?.insert_axis(Axis(0)))
    } else {
        three(volume.view())
    }
}

/// The edge map computed on the CPU with `cwseg_morphology::contour_map` (include the
/// background: every voxel counts), `u8` `(N, D, H, W)` on the CPU.
pub fn edges_cpu(labels: &Tensor, contour: &ContourConfig) -> Result<Tensor> {
    contour.validate("contour")?;
    let spec = ContourSpec {
        erosion: contour.erosion(),
        include_background: true,
    };
    let mut flat = Vec::new();
    for volume in label_volumes(labels)? {
        let map = per_volume(
            &volume,
            |v| Ok(cwseg_morphology::contour_map(v, &spec)?.into_union()),
            |v| Ok(cwseg_morphology::contour_map(v, &spec)?.into_union()),
        )?;
        flat.extend(map.iter().map(|&e| e as u8));
    }
    Ok(Tensor::from_vec(flat, labels.dims(), &Device::Cpu)?)
}

/// DWCE weight maps (formulas §3) of every sample, f32 `(N, D, H, W)` on the CPU.
pub fn dwce_weights_cpu(labels: &Tensor, spec: &DwceSpec) -> Result<Tensor> {
    let maps = label_volumes(labels)?
        .iter()
        .map(|v| {
            let m = per_volume(
                v,
                |v| Ok(cwseg_morphology::dwce_weight_map(v, None, spec)?),
                |v| Ok(cwseg_morphology::dwce_weight_map(v, None, spec)?),
            )?;
            Ok(m.iter().copied().collect())
        })
        .collect::<Result<Vec<Vec<f32>>>>()?;
    stack(maps, labels.dims())
}

/// Skeleton Recall's tubed skeletons (`cwseg_morphology::tubed_skeleton`: the skeleton of the
/// foreground dilated twice by the cross, times the labels) of every sample, `u32` class indices
/// `(N, D, H, W)` on the CPU; samples in parallel. A `D = 1` sample is thinned as a one-slice
/// volume.
pub fn skeleton_cpu(labels: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let maps = label_volumes(labels)?
        .par_iter()
        .map(|v| {
            Ok(cwseg_morphology::tubed_skeleton(v.view())?
                .into_iter()
                .collect())
        })
        .collect::<Result<Vec<Vec<u32>>>>()?;
    let flat: Vec<u32> = maps.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, labels.dims(), &Device::Cpu)?)
}

/// Signed distances `φ_k` (negative inside class k, 0 for an absent class) of every sample and
/// class, f32 `(N, K, D, H, W)` on the CPU.
pub fn signed_distance_cpu(labels: &Tensor, classes: usize) -> Result<Tensor> {
    let mut maps = Vec::new();
    for v in label_volumes(labels)? {
        for k in 0..classes as u32 {
            let mask = v.mapv(|l| l == k);
            let phi = if mask.dim().0 == 1 {
                let image = mask.index_axis(Axis(0), 0);
                cwseg_morphology::signed_distance(image, None)?.insert_axis(Axis(0))
            } else {
                cwseg_morphology::signed_distance(mask.view(), None)?
            };
            maps.push(phi.iter().copied().collect());
        }
    }
    let mut shape = labels.dims().to_vec();
    shape.insert(1, classes);
    stack(maps, &shape)
}
