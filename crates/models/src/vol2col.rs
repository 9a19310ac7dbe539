//! The CPU fast path of `conv3d`: vol2col as a custom op (with col2vol as its backward), so
//! that the convolution becomes one `gemm` matrix product per block of output slices, which
//! candle runs multi-threaded and differentiates.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, bail};
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
pub(crate) struct Vol2Col(pub Geometry);

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

fn fold<T: Copy + Default + Send + Sync + std::ops::AddAssign>(g: &Geometry, cols: &[T]) -> Vec<T> {
    let volume = g.input[1] * g.input[2] * g.input[3];
    let per_channel = g.rows() / g.input[0].max(1) * g.cols();
    let mut out = vec![T::default(); g.input[0] * volume];
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
    out
}

impl CustomOp1 for Vol2Col {
    fn name(&self) -> &'static str {
        "cwseg-vol2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let shape = Shape::from((g.rows(), g.cols()));
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("vol2col: the input must be contiguous");
        };
        Ok(match storage {
            CpuStorage::F32(x) => (CpuStorage::F32(unfold(g, &x[start..end])), shape),
            CpuStorage::F64(x) => (CpuStorage::F64(unfold(g, &x[start..end])), shape),
            _ => bail!("vol2col: f32 or f64 only"),
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = &self.0;
        let grad = grad.contiguous()?;
        let shape = arg.shape().clone();
        let (storage, layout) = grad.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("col2vol: the gradient must be contiguous");
        };
        let folded = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => {
                Tensor::from_vec(fold(g, &v[start..end]), shape, arg.device())?
            }
            Storage::Cpu(CpuStorage::F64(v)) => {
                Tensor::from_vec(fold(g, &v[start..end]), shape, arg.device())?
            }
            _ => bail!(
                "col2vol: f32 or f64 on the CPU only, got {:?}",
                grad.dtype()
            ),
        };
        Ok(Some(folded))
    }
}
