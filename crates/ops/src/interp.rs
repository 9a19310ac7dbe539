//! Linear interpolation along one axis of a contiguous f32 tensor on the CPU, as a custom op
//! with its backward pass: the trilinear upsampling is three of them. The composite it
//! replaces (two `index_select`s, a subtraction, a product and a sum per axis) spends its
//! backward in candle's single-threaded `index_add` (7 % of a DeepLabV3 training step).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::fused::f32_slice;

/// Where output position `j` of an axis reads: `y_j = x[lo_j] + t_j·(x[hi_j] − x[lo_j])`.
#[derive(Debug, Clone)]
pub(crate) struct AxisTaps {
    pub lo: Vec<usize>,
    pub hi: Vec<usize>,
    pub frac: Vec<f32>,
}

/// Linear interpolation along `axis` of an `(outer, n_in, inner)` view: `n_in` → `lo.len()`.
struct Interp1d {
    taps: AxisTaps,
    axis: usize,
}

impl Interp1d {
    /// `(outer, n_in, inner)` of a shape, checked against the taps.
    fn view(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let dims = shape.dims();
        let n_in = dims[self.axis];
        if self.taps.lo.iter().chain(&self.taps.hi).any(|&i| i >= n_in) {
            bail!("interpolation: a tap is past the axis' {n_in} positions");
        }
        let outer = dims[..self.axis].iter().product();
        let inner = dims[self.axis + 1..].iter().product();
        Ok((outer, n_in, inner))
    }

    fn out_shape(&self, shape: &Shape) -> Shape {
        let mut dims = shape.dims().to_vec();
        dims[self.axis] = self.taps.lo.len();
        Shape::from(dims)
    }

    /// `y[o, j, :] = x[o, lo_j, :] + t_j·(x[o, hi_j, :] − x[o, lo_j, :])`.
    fn forward(&self, x: &[f32], (outer, n_in, inner): (usize, usize, usize)) -> Vec<f32> {
        let n_out = self.taps.lo.len();
        let mut y = vec![0f32; outer * n_out * inner];
        if y.is_empty() {
            return y;
        }
        y.par_chunks_mut(n_out * inner)
            .zip(x.par_chunks(n_in * inner))
            .for_each(|(yo, xo)| {
                for (j, row) in yo.chunks_exact_mut(inner).enumerate() {
                    let a = &xo[self.taps.lo[j] * inner..][..inner];
                    let b = &xo[self.taps.hi[j] * inner..][..inner];
                    let t = self.taps.frac[j];
                    for ((v, &a), &b) in row.iter_mut().zip(a).zip(b) {
                        *v = a + (b - a) * t;
                    }
                }
            });
        y
    }

    /// The transpose: `dx[o, lo_j, :] += g[o, j, :] − t_j·g[o, j, :]`,
    /// `dx[o, hi_j, :] += t_j·g[o, j, :]`, output positions in order.
    fn backward(&self, g: &[f32], (outer, n_in, inner): (usize, usize, usize)) -> Vec<f32> {
        let n_out = self.taps.lo.len();
        let mut dx = vec![0f32; outer * n_in * inner];
        if dx.is_empty() {
            return dx;
        }
        dx.par_chunks_mut(n_in * inner)
            .zip(g.par_chunks(n_out * inner))
            .for_each(|(dxo, go)| {
                for (j, row) in go.chunks_exact(inner).enumerate() {
                    let t = self.taps.frac[j];
                    let lo = &mut dxo[self.taps.lo[j] * inner..][..inner];
                    for (d, &g) in lo.iter_mut().zip(row) {
                        *d += g - g * t;
                    }
                    let hi = &mut dxo[self.taps.hi[j] * inner..][..inner];
                    for (d, &g) in hi.iter_mut().zip(row) {
                        *d += g * t;
                    }
                }
            });
        dx
    }
}

impl CustomOp1 for Interp1d {
    fn name(&self) -> &'static str {
        "cwseg-interp1d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let view = self.view(l.shape())?;
        let y = self.forward(f32_slice(s, l)?, view);
        Ok((CpuStorage::F32(y), self.out_shape(l.shape())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Interp1dGrad {
            forward: Interp1d {
                taps: self.taps.clone(),
                axis: self.axis,
            },
            input: x.shape().clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The backward pass of [`Interp1d`] as an op over the output gradient.
struct Interp1dGrad {
    forward: Interp1d,
    input: Shape,
}

impl CustomOp1 for Interp1dGrad {
    fn name(&self) -> &'static str {
        "cwseg-interp1d-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let view = self.forward.view(&self.input)?;
        if self.forward.out_shape(&self.input) != *l.shape() {
            bail!("interpolation backward: gradient shape {:?}", l.shape());
        }
        let dx = self.forward.backward(f32_slice(s, l)?, view);
        Ok((CpuStorage::F32(dx), self.input.clone()))
    }
}

/// Linear interpolation of the f32 CPU tensor `x` along `axis` at `taps`.
pub(crate) fn interp_axis(x: &Tensor, axis: usize, taps: AxisTaps) -> Result<Tensor> {
    if taps.lo.len() != taps.hi.len() || taps.lo.len() != taps.frac.len() {
        bail!("interpolation: taps of different lengths");
    }
    x.contiguous()?.apply_op1(Interp1d { taps, axis })
}
