//! The CPU fast path of `conv3d`: one custom op that unfolds a block of output slices at a
//! time (vol2col), multiplies it with the weights (candle's multi-threaded `gemm`), and drops
//! it; its backward pass recomputes each block's columns for the weight gradient and folds the
//! columns' gradient back (col2vol) — memory of one block, not of the whole volume.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Geometry of one sample's convolution: input `(C, D, H, W)`, kernel `(kd, kh, kw)`, output
/// `(Do, Ho, Wo)`, and the block of output depths `od0..od0 + dn` this op unfolds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub input: [usize; 4],
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub padding: [usize; 3],
    pub dilation: [usize; 3],
    pub output: [usize; 3],
    pub od0: usize,
    pub dn: usize,
}

impl Geometry {
    fn rows(&self) -> usize {
        self.input[0] * self.kernel.iter().product::<usize>()
    }

    fn cols(&self) -> usize {
        self.dn * self.output[1] * self.output[2]
    }

    /// Calls `f(column index, input index, count)` for every run of taps inside the input:
    /// `count` consecutive columns reading inputs `stride[2]` apart along `w`.
    #[inline]
    fn visit(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [c_n, d, h, w] = self.input;
        let [kd, kh, kw] = self.kernel;
        let [_, oh_n, ow_n] = self.output;
        let cols = self.cols();
        let (sw, pw) = (self.stride[2], self.padding[2] as isize);
        for c in 0..c_n {
            for a in 0..kd {
                for b in 0..kh {
                    for e in 0..kw {
                        let row = ((c * kd + a) * kh + b) * kw + e;
                        // Output columns whose tap x = ow·sw + e·dw − pw lies in 0..w.
                        let offset = (e * self.dilation[2]) as isize - pw;
                        let first = if offset >= 0 {
                            0
                        } else {
                            ((-offset) as usize).div_ceil(sw)
                        };
                        let end = if (w as isize) <= offset {
                            0
                        } else {
                            (((w as isize - offset) as usize).div_ceil(sw)).min(ow_n)
                        };
                        if first >= end {
                            continue;
                        }
                        for j in 0..self.dn {
                            let z = ((self.od0 + j) * self.stride[0] + a * self.dilation[0])
                                as isize
                                - self.padding[0] as isize;
                            if z < 0 || z >= d as isize {
                                continue;
                            }
                            for oh in 0..oh_n {
                                let y = (oh * self.stride[1] + b * self.dilation[1]) as isize
                                    - self.padding[1] as isize;
                                if y < 0 || y >= h as isize {
                                    continue;
                                }
                                let base_in = ((c * d + z as usize) * h + y as usize) * w;
                                let base_col = row * cols + (j * oh_n + oh) * ow_n;
                                let x0 = (first * sw) as isize + offset;
                                f(base_col + first, base_in + x0 as usize, end - first);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Unfolds one sample `(C, D, H, W)` into `(C·kd·kh·kw, dn·Ho·Wo)`.
fn unfold<T: Copy + Default + Send + Sync>(g: &Geometry, x: &[T]) -> Vec<T> {
    let (rows, cols) = (g.rows(), g.cols());
    let mut out = vec![T::default(); rows * cols];
    // One task per input channel: its rows are contiguous in the output.
    let per_channel = rows / g.input[0].max(1) * cols;
    out.par_chunks_mut(per_channel.max(1))
        .enumerate()
        .for_each(|(c, block)| {
            let mut one = *g;
            one.input[0] = 1;
            let channel = &x[c * g.input[1] * g.input[2] * g.input[3]..];
            let step = g.stride[2];
            one.visit(|col, input, count| {
                let out = &mut block[col..col + count];
                if step == 1 {
                    out.copy_from_slice(&channel[input..input + count]);
                } else {
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = channel[input + i * step];
                    }
                }
            });
        });
    out
}

/// Adds the columns' values back onto the voxels they were read from (col2vol), into `out`
/// (one sample `(C, D, H, W)`).
fn fold_into<T: Copy + Send + Sync + std::ops::AddAssign>(g: &Geometry, cols: &[T], out: &mut [T]) {
    let volume = g.input[1] * g.input[2] * g.input[3];
    let per_channel = g.rows() / g.input[0].max(1) * g.cols();
    out.par_chunks_mut(volume.max(1))
        .enumerate()
        .for_each(|(c, channel)| {
            let mut one = *g;
            one.input[0] = 1;
            let block = &cols[c * per_channel..(c + 1) * per_channel];
            let step = g.stride[2];
            one.visit(|col, input, count| {
                for (i, &v) in block[col..col + count].iter().enumerate() {
                    channel[input + i * step] += v;
                }
            });
        });
}

/// The whole CPU convolution as one custom op over `(x, w)`: column blocks are made, used and
/// dropped one at a time, in the forward pass and again in the backward pass (recomputed), so
/// memory stays at one block however large the volume — autograd never holds column matrices.
/// `x` is `(N, C, D, H, W)`, `w` is `(O, C·kd·kh·kw)`; the output `(N, O, Do, Ho, Wo)`.
pub(crate) struct Conv3dCpu {
    /// Geometry of a whole sample (`od0 = 0`, `dn = Do`).
    pub geometry: Geometry,
    /// Output depths per block.
    pub block: usize,
    /// Samples.
    pub samples: usize,
    /// Output channels.
    pub out_channels: usize,
}

impl Conv3dCpu {
    fn blocks(&self) -> impl Iterator<Item = Geometry> + '_ {
        let od = self.geometry.output[0];
        (0..od).step_by(self.block.max(1)).map(move |od0| Geometry {
            od0,
            dn: self.block.min(od - od0),
            ..self.geometry
        })
    }

    fn forward<T: candle_core::WithDType + Default + Send + Sync>(
        &self,
        x: &[T],
        w: &[T],
    ) -> Result<Vec<T>> {
        let g = &self.geometry;
        let dev = candle_core::Device::Cpu;
        let (rows, o) = (g.rows(), self.out_channels);
        let input: usize = g.input.iter().product();
        let plane = g.output[1] * g.output[2];
        let per_sample = o * g.output[0] * plane;
        let weights = Tensor::from_slice(w, (o, rows), &dev)?;
        let mut out = vec![T::default(); self.samples * per_sample];
        for n in 0..self.samples {
            let sample = &x[n * input..(n + 1) * input];
            for b in self.blocks() {
                let cols = Tensor::from_vec(unfold(&b, sample), (rows, b.cols()), &dev)?;
                let y: Vec<T> = weights.matmul(&cols)?.flatten_all()?.to_vec1()?;
                let width = b.dn * plane;
                for c in 0..o {
                    let at = n * per_sample + c * g.output[0] * plane + b.od0 * plane;
                    out[at..at + width].copy_from_slice(&y[c * width..(c + 1) * width]);
                }
            }
        }
        Ok(out)
    }
}

impl Conv3dCpu {
    /// One sample's input gradient; adds its weight gradient to `dw`. Columns are recomputed
    /// block by block.
    fn backward_sample<T: candle_core::WithDType + Default + Send + Sync + std::ops::AddAssign>(
        &self,
        sample: &Tensor,
        gy: &Tensor,
        w_t: &Tensor,
        dw: &mut Tensor,
    ) -> Result<Tensor> {
        let g = &self.geometry;
        let plane = g.output[1] * g.output[2];
        let values: Vec<T> = sample.flatten_all()?.to_vec1()?;
        let mut dx = vec![T::default(); values.len()];
        for b in self.blocks() {
            let gy_block = gy.narrow(1, b.od0 * plane, b.dn * plane)?.contiguous()?;
            let cols =
                Tensor::from_vec(unfold(&b, &values), (g.rows(), b.cols()), sample.device())?;
            *dw = (&*dw + gy_block.matmul(&cols.t()?)?)?;
            let dcols: Vec<T> = w_t.matmul(&gy_block)?.flatten_all()?.to_vec1()?;
            fold_into(&b, &dcols, &mut dx);
        }
        Tensor::from_vec(dx, sample.shape(), sample.device())
    }
}

impl candle_core::CustomOp2 for Conv3dCpu {
    fn name(&self) -> &'static str {
        "cwseg-conv3d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("conv3d: contiguous inputs expected");
        };
        let g = &self.geometry;
        let shape = Shape::from((
            self.samples,
            self.out_channels,
            g.output[0],
            g.output[1],
            g.output[2],
        ));
        Ok(match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (
                CpuStorage::F32(self.forward(&x[a0..a1], &w[b0..b1])?),
                shape,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => (
                CpuStorage::F64(self.forward(&x[a0..a1], &w[b0..b1])?),
                shape,
            ),
            _ => bail!("conv3d: f32 or f64 inputs of one dtype expected"),
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = &self.geometry;
        let o = self.out_channels;
        let plane = g.output[1] * g.output[2];
        let grad = grad.contiguous()?;
        let x = x.contiguous()?;
        let w_t = w.t()?;
        let mut dw = w.zeros_like()?;
        let mut dx_samples = Vec::with_capacity(self.samples);
        for n in 0..self.samples {
            let gy = grad.get(n)?.reshape((o, g.output[0] * plane))?;
            let sample = x.get(n)?;
            let dx = match x.dtype() {
                candle_core::DType::F32 => {
                    self.backward_sample::<f32>(&sample, &gy, &w_t, &mut dw)?
                }
                candle_core::DType::F64 => {
                    self.backward_sample::<f64>(&sample, &gy, &w_t, &mut dw)?
                }
                other => bail!("conv3d backward: f32 or f64 only, got {other:?}"),
            };
            dx_samples.push(dx);
        }
        Ok((Some(Tensor::stack(&dx_samples, 0)?), Some(dw)))
    }
}
