//! The CPU fast path of `conv3d`: one custom op that unfolds a block of output slices at a
//! time (vol2col), multiplies it with the weights (one multi-threaded `gemm` call), and drops
//! it; its backward pass recomputes each block's columns for the weight gradient and folds the
//! columns' gradient back (col2vol) — memory of one block, not of the whole volume.
//!
//! `unsafe` for the `gemm` crate's raw-pointer interface ([`product`]): every pointer comes from
//! a buffer whose length `Conv3dCpu::check` has matched to the geometry.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fused::with_values;

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
fn unfold<T: candle_core::WithDType>(g: &Geometry, x: &[T]) -> Vec<T> {
    let (rows, cols) = (g.rows(), g.cols());
    let mut out = vec![T::zero(); rows * cols];
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
fn fold_into<T: candle_core::WithDType>(g: &Geometry, cols: &[T], out: &mut [T]) {
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

/// A matrix operand of [`product`]: element `(i, j)` at `ptr + i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View<P> {
    ptr: P,
    row_stride: usize,
    col_stride: usize,
}

impl<P> View<P> {
    /// A row-major matrix whose rows are `stride` apart.
    pub(crate) fn rows(ptr: P, stride: usize) -> Self {
        View {
            ptr,
            row_stride: stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `stride` apart.
    pub(crate) fn columns(ptr: P, stride: usize) -> Self {
        View {
            ptr,
            row_stride: 1,
            col_stride: stride,
        }
    }
}

/// Whether [`product`] overwrites its destination or adds to it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    Overwrite,
    Add,
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, or `dst += …` (`Write::Add`), by `gemm` on the
/// whole pool (its threads share the output's tiles; `k` is summed in sequential chunks, as in
/// candle's `matmul`, which calls the same function).
///
/// # Safety
/// Every element `(i, j)` of the three shapes lies inside the buffer behind its view's
/// pointer, and `dst` overlaps neither operand.
pub(crate) unsafe fn product<T: candle_core::WithDType>(
    [m, n, k]: [usize; 3],
    dst: View<*mut T>,
    lhs: View<*const T>,
    rhs: View<*const T>,
    write: Write,
) {
    let one = T::from_f64(1.0);
    // SAFETY: the caller's contract, passed on to gemm.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col_stride as isize,
            dst.row_stride as isize,
            write == Write::Add,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            one,
            one,
            false,
            false,
            false,
            Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// The whole CPU convolution as one custom op over `(x, w)`: column blocks are made, used and
/// dropped one at a time, in the forward pass and again in the backward pass (recomputed), so
/// memory stays at one block however large the volume — autograd never holds column matrices.
/// `x` is `(N, C, D, H, W)`, `w` is `(O, C·kd·kh·kw)`; the output `(N, O, Do, Ho, Wo)`. Each
/// block is one `gemm` product written in place into the output (forward), and two in the
/// backward pass: the weight gradient accumulated in place over all blocks and samples,
/// `dW += dY_b · colsᵀ`, and the columns' gradient `Wᵀ · dY_b` folded onto the input gradient.
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

    /// Values of one sample's input and of its output.
    fn sizes(&self) -> (usize, usize) {
        let g = &self.geometry;
        let input = g.input.iter().product();
        (
            input,
            self.out_channels * g.output.iter().product::<usize>(),
        )
    }

    fn check<T>(&self, x: &[T], w: &[T], y: Option<&[T]>) -> Result<()> {
        let (input, output) = self.sizes();
        let fits = x.len() == self.samples * input
            && w.len() == self.out_channels * self.geometry.rows()
            && y.is_none_or(|y| y.len() == self.samples * output);
        if !fits {
            bail!(
                "conv3d: {} input and {} weight values do not match {} samples of {:?} → {} channels, kernel {:?}",
                x.len(),
                w.len(),
                self.samples,
                self.geometry.input,
                self.out_channels,
                self.geometry.kernel
            );
        }
        Ok(())
    }

    fn forward<T: candle_core::WithDType>(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        self.check(x, w, None)?;
        let g = &self.geometry;
        let (rows, o) = (g.rows(), self.out_channels);
        let (input, per_sample) = self.sizes();
        let plane = g.output[1] * g.output[2];
        let mut out = vec![T::zero(); self.samples * per_sample];
        for n in 0..self.samples {
            let sample = &x[n * input..(n + 1) * input];
            for b in self.blocks() {
                let cols = unfold(&b, sample);
                let width = b.cols();
                // SAFETY: dst = the block's output depths of every channel of sample n
                // (o × width, rows g.output[0]·plane apart, inside `out`); lhs = w (o × rows,
                // `check`ed); rhs = cols (rows × width, its own length).
                unsafe {
                    product(
                        [o, width, rows],
                        View {
                            ptr: out.as_mut_ptr().add(n * per_sample + b.od0 * plane),
                            row_stride: g.output[0] * plane,
                            col_stride: 1,
                        },
                        View {
                            ptr: w.as_ptr(),
                            row_stride: rows,
                            col_stride: 1,
                        },
                        View {
                            ptr: cols.as_ptr(),
                            row_stride: width,
                            col_stride: 1,
                        },
                        Write::Overwrite,
                    );
                }
            }
        }
        Ok(out)
    }

    /// The input and weight gradients from the output gradient `gy`, each only if `needed`;
    /// columns are recomputed block by block.
    fn backward<T: candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        gy: &[T],
        needed: Needed,
    ) -> Result<Grads<T>> {
        self.check(x, w, Some(gy))?;
        let g = &self.geometry;
        let (input, per_sample) = self.sizes();
        let plane = g.output[1] * g.output[2];
        let mut dx = needed.input.then(|| vec![T::zero(); x.len()]);
        let mut dw = needed.weight.then(|| vec![T::zero(); w.len()]);
        let mut dcols = Vec::new();
        let mut write = Write::Overwrite;
        for n in 0..self.samples {
            let sample = &x[n * input..(n + 1) * input];
            for b in self.blocks() {
                let gy_block = View {
                    ptr: gy[n * per_sample + b.od0 * plane..].as_ptr(),
                    row_stride: g.output[0] * plane,
                    col_stride: 1,
                };
                if let Some(dw) = dw.as_mut() {
                    // SAFETY: gy_block is the block's output depths of every channel of sample
                    // n (o × width inside `gy`, `check`ed); dw is o × rows (`check`ed).
                    unsafe { self.add_weight_grad(&b, sample, gy_block, dw, write) };
                    write = Write::Add;
                }
                if let Some(dx) = dx.as_mut() {
                    // SAFETY: as above; w is o × rows (`check`ed).
                    unsafe { self.input_grad_block(&b, gy_block, w, &mut dcols) };
                    fold_into(&b, &dcols, &mut dx[n * input..(n + 1) * input]);
                }
            }
        }
        Ok((dx, dw))
    }

    /// `dW (o × rows) += dY_b (o × width) · colsᵀ` for block `b` of `sample`, or `=` for the
    /// first block (`Write::Overwrite`).
    ///
    /// # Safety
    /// `gy_block` views `o × b.cols()` values and `dw` holds `o × rows`.
    unsafe fn add_weight_grad<T: candle_core::WithDType>(
        &self,
        b: &Geometry,
        sample: &[T],
        gy_block: View<*const T>,
        dw: &mut [T],
        write: Write,
    ) {
        let (rows, width) = (b.rows(), b.cols());
        let cols = unfold(b, sample);
        // SAFETY: the caller's contract for gy_block and dw; cols is rows × width (its
        // length), read transposed as width × rows.
        unsafe {
            product(
                [self.out_channels, rows, width],
                View {
                    ptr: dw.as_mut_ptr(),
                    row_stride: rows,
                    col_stride: 1,
                },
                gy_block,
                View {
                    ptr: cols.as_ptr(),
                    row_stride: 1,
                    col_stride: width,
                },
                write,
            );
        }
    }

    /// The columns' gradient of block `b`, `Wᵀ (rows × o) · dY_b (o × width)`, into `dcols`.
    ///
    /// # Safety
    /// `gy_block` views `o × b.cols()` values and `w` holds `o × rows`.
    unsafe fn input_grad_block<T: candle_core::WithDType>(
        &self,
        b: &Geometry,
        gy_block: View<*const T>,
        w: &[T],
        dcols: &mut Vec<T>,
    ) {
        let (rows, width) = (b.rows(), b.cols());
        dcols.resize(rows * width, T::zero());
        // SAFETY: the caller's contract for gy_block and w (read transposed as rows × o);
        // dcols is rows × width (resized above).
        unsafe {
            product(
                [rows, width, self.out_channels],
                View {
                    ptr: dcols.as_mut_ptr(),
                    row_stride: width,
                    col_stride: 1,
                },
                View {
                    ptr: w.as_ptr(),
                    row_stride: 1,
                    col_stride: rows,
                },
                gy_block,
                Write::Overwrite,
            );
        }
    }
}

/// The input and weight gradients of a [`ColumnConv`]'s backward pass, each if it was needed.
pub(crate) type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>);

/// Which gradients the backward pass computes.
#[derive(Clone, Copy)]
pub(crate) struct Needed {
    pub(crate) input: bool,
    pub(crate) weight: bool,
}

/// A CPU convolution by column matrices and `gemm` over `(x, w)`, `x` `(N, C, D, H, W)` and
/// `w` `(O, C·kd·kh·kw)`, contiguous, f32 or f64: [`Conv3dCpu`] (blocks of output slices) or
/// `tiles::TiledConv` (tiles of live taps). [`ColumnOp`] makes it a custom op.
pub(crate) trait ColumnConv: Send + Sync {
    /// `(N, O, Do, Ho, Wo)`.
    fn output_shape(&self) -> Shape;
    /// The output.
    fn forward<T: candle_core::WithDType>(&self, x: &[T], w: &[T]) -> Result<Vec<T>>;
    /// The input and weight gradients from the output's, each only if `needed`.
    fn backward<T: candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        gy: &[T],
        needed: Needed,
    ) -> Result<Grads<T>>;
}

impl ColumnConv for Conv3dCpu {
    fn output_shape(&self) -> Shape {
        let g = &self.geometry;
        Shape::from((
            self.samples,
            self.out_channels,
            g.output[0],
            g.output[1],
            g.output[2],
        ))
    }

    fn forward<T: candle_core::WithDType>(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        Conv3dCpu::forward(self, x, w)
    }

    fn backward<T: candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        gy: &[T],
        needed: Needed,
    ) -> Result<Grads<T>> {
        Conv3dCpu::backward(self, x, w, gy, needed)
    }
}

/// A [`ColumnConv`] as candle's custom op over `(x, w)`.
pub(crate) struct ColumnOp<C>(pub(crate) C);

impl<C: ColumnConv> candle_core::CustomOp2 for ColumnOp<C> {
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
        let shape = self.0.output_shape();
        Ok(match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (
                CpuStorage::F32(self.0.forward(&x[a0..a1], &w[b0..b1])?),
                shape,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => (
                CpuStorage::F64(self.0.forward(&x[a0..a1], &w[b0..b1])?),
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
        fn grads<T: candle_core::WithDType, C: ColumnConv>(
            op: &C,
            x: &Tensor,
            w: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            // A network's first convolution reads the data, whose gradient no one uses.
            let needed = Needed {
                input: x.track_op(),
                weight: w.track_op(),
            };
            let (dx, dw) = with_values::<T, _>(x, |xv| {
                with_values::<T, _>(w, |wv| {
                    with_values::<T, _>(grad, |gv| op.backward(xv, wv, gv, needed))
                })
            })?;
            let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), x.device()));
            let dw = dw.map(|v| Tensor::from_vec(v, w.shape(), w.device()));
            Ok((dx.transpose()?, dw.transpose()?))
        }
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => grads::<f32, C>(&self.0, x, w, grad)?,
            candle_core::DType::F64 => grads::<f64, C>(&self.0, x, w, grad)?,
            other => bail!("conv3d backward: f32 or f64 only, got {other:?}"),
        };
        Ok((dx, dw))
    }
}
