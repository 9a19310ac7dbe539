//! The CPU f32 transposed convolution whose kernel equals its stride (the U-Net's, V-Net's and
//! UNETR's up-sampling): every input voxel writes its own `k = kd·kh·kw` block of the output, so
//! with the weight viewed as `W (C_in × C_out·k)` and a sample as `X (C_in × S)`,
//! `S = D·H·W`, the output is the product `P = Wᵀ X (C_out·k × S)` scattered into the blocks:
//!
//! `y[o, z·kd + a, y·kh + b, x·kw + c] = P[o·k + (a·kh + b)·kw + c, (z·H + y)·W + x] + bias[o]`.
//!
//! Backward, with `G` the output gradient gathered back into `P`'s layout:
//! `dX = W G`, `dW = Σₙ X Gᵀ`, `dbias[o] = Σ dy[·, o, …]`. Only `x` and the weight are kept for
//! the backward pass (candle's composite of matmul, permute and copy keeps three output-sized
//! tensors), and every step runs in parallel: blocks of output channels forward, chunks of
//! input voxels backward. The weight gradient sums fixed-size chunks in a fixed order, so it is
//! the same for any thread count.
//!
//! `unsafe` for the `gemm` crate's raw-pointer interface and for the input gradient's disjoint
//! column chunks written from parallel tasks; every pointer comes from a buffer whose length
//! [`Patches::check`] has matched to the geometry.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::direct::Shared;
use crate::fused::{channel_sums, f32_slice, with_f32, zeros};

/// Output channels per forward task: `OUT_BLOCK·k` rows of `P` per `gemm`.
const OUT_BLOCK: usize = 4;

/// The geometry of one transposed convolution with kernel = stride, and the op over
/// `(x, weight[, bias])`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Patches {
    /// Samples `N`.
    pub samples: usize,
    /// Input channels `C_in`.
    pub in_channels: usize,
    /// Output channels `C_out`.
    pub out_channels: usize,
    /// Input size `[D, H, W]`.
    pub input: [usize; 3],
    /// Kernel = stride `[kd, kh, kw]`.
    pub kernel: [usize; 3],
    /// Input voxels per backward task (a constant, so the weight gradient's summation order
    /// does not depend on the thread count; smaller in tests to exercise the chunking).
    pub chunk: usize,
}

impl Patches {
    /// Input voxels per backward task in the networks.
    pub(crate) const CHUNK: usize = 4096;

    fn volume(&self) -> usize {
        self.input.iter().product()
    }

    fn taps(&self) -> usize {
        self.kernel.iter().product()
    }

    fn output(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.input[a] * self.kernel[a])
    }

    fn shape(&self) -> Shape {
        let [d, h, w] = self.output();
        Shape::from((self.samples, self.out_channels, d, h, w))
    }

    fn check(&self, x: &[f32], w: &[f32]) -> Result<()> {
        let (s, c, o) = (self.samples, self.in_channels, self.out_channels);
        if x.len() != s * c * self.volume() || w.len() != c * o * self.taps() {
            bail!(
                "conv_transpose3d: {} input and {} weight values for {s}×{c}×{:?} → {o} channels, kernel {:?}",
                x.len(),
                w.len(),
                self.input,
                self.kernel
            );
        }
        Ok(())
    }

    /// The output `(N, C_out, D·kd, H·kh, W·kw)`, plus `bias` per output channel if given.
    fn forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (c, o, k, volume) = (
            self.in_channels,
            self.out_channels,
            self.taps(),
            self.volume(),
        );
        let plane = volume * k;
        let mut out = zeros(self.samples * o * plane);
        out.par_chunks_mut(o * plane)
            .enumerate()
            .for_each(|(n, sample)| {
                let xn = &x[n * c * volume..][..c * volume];
                sample
                    .par_chunks_mut(OUT_BLOCK * plane)
                    .enumerate()
                    .for_each(|(j, planes)| {
                        let first = j * OUT_BLOCK;
                        let rows = planes.len() / plane * k;
                        let mut p = vec![0f32; rows * volume];
                        // SAFETY: dst = p, rows × S row-major (rows·S values); lhs = the
                        // columns first·k.. first·k + rows of W (C_in × C_out·k row-major),
                        // read transposed (row stride 1, column stride C_out·k): inside w, whose
                        // length `check` matched; rhs = X (C_in × S row-major), xn's length.
                        unsafe {
                            gemm::gemm(
                                rows,
                                volume,
                                c,
                                p.as_mut_ptr(),
                                1,
                                volume as isize,
                                false,
                                w.as_ptr().add(first * k),
                                (o * k) as isize,
                                1,
                                xn.as_ptr(),
                                1,
                                volume as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                Parallelism::None,
                            );
                        }
                        for (i, (channel, rows)) in planes
                            .chunks_mut(plane)
                            .zip(p.chunks(k * volume))
                            .enumerate()
                        {
                            self.scatter(rows, bias.map_or(0.0, |b| b[first + i]), channel);
                        }
                    });
            });
        out
    }

    /// One output channel from its `k` rows of `P` (`k × S`), plus `shift`; written in order.
    fn scatter(&self, rows: &[f32], shift: f32, channel: &mut [f32]) {
        let [d, h, w] = self.input;
        let [kd, kh, kw] = self.kernel;
        let volume = self.volume();
        let mut at = 0;
        for z in 0..d {
            for a in 0..kd {
                for y in 0..h {
                    for b in 0..kh {
                        let row = (z * h + y) * w;
                        let tap = (a * kh + b) * kw;
                        for x in 0..w {
                            for cc in 0..kw {
                                channel[at] = rows[(tap + cc) * volume + row + x] + shift;
                                at += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The input voxels `q0..q0 + len` of one output-gradient channel gathered into `k` rows
    /// of `len` (`G`'s layout): the inverse of [`Patches::scatter`].
    fn gather(&self, channel: &[f32], q0: usize, len: usize, rows: &mut [f32]) {
        let [_, h, w] = self.input;
        let [kd, kh, kw] = self.kernel;
        let [_, ho, wo] = self.output();
        for i in 0..len {
            let q = q0 + i;
            let (z, y, x) = (q / (h * w), q / w % h, q % w);
            for a in 0..kd {
                for b in 0..kh {
                    let at = ((z * kd + a) * ho + y * kh + b) * wo + x * kw;
                    let tap = (a * kh + b) * kw;
                    for cc in 0..kw {
                        rows[(tap + cc) * len + i] = channel[at + cc];
                    }
                }
            }
        }
    }

    /// `(dx, dw)` for the output gradient `dy`.
    fn grads(&self, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (c, o, k, volume) = (
            self.in_channels,
            self.out_channels,
            self.taps(),
            self.volume(),
        );
        let plane = volume * k;
        let mut dx = zeros(self.samples * c * volume);
        let dx_all = Shared(dx.as_mut_ptr());
        let tasks: Vec<(usize, usize, usize)> = (0..self.samples)
            .flat_map(|n| {
                (0..volume)
                    .step_by(self.chunk)
                    .map(move |q0| (n, q0, self.chunk.min(volume - q0)))
            })
            .collect();
        let partials: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(n, q0, len)| {
                let mut g = vec![0f32; o * k * len];
                for (oc, rows) in g.chunks_mut(k * len).enumerate() {
                    self.gather(&dy[(n * o + oc) * plane..][..plane], q0, len, rows);
                }
                let xn = &x[n * c * volume..][..c * volume];
                let mut dw = vec![0f32; c * o * k];
                let dst = dx_all.get();
                // SAFETY: first product: dst = columns q0..q0 + len of dX_n (C_in × S
                // row-major, inside dx: n < N, q0 + len ≤ S), written by this task only (tasks
                // partition the samples' columns); lhs = W (C_in × C_out·k row-major), rhs = G
                // (C_out·k × len row-major), g's length. Second: dst = dw (C_in × C_out·k);
                // lhs = the same columns of X_n; rhs = Gᵀ (len × C_out·k: row stride 1,
                // column stride len).
                unsafe {
                    gemm::gemm(
                        c,
                        len,
                        o * k,
                        dst.add(n * c * volume + q0),
                        1,
                        volume as isize,
                        false,
                        w.as_ptr(),
                        1,
                        (o * k) as isize,
                        g.as_ptr(),
                        1,
                        len as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    gemm::gemm(
                        c,
                        o * k,
                        len,
                        dw.as_mut_ptr(),
                        1,
                        (o * k) as isize,
                        false,
                        xn.as_ptr().add(q0),
                        1,
                        volume as isize,
                        g.as_ptr(),
                        len as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; c * o * k];
        for partial in &partials {
            dw.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
        }
        (dx, dw)
    }

    fn output_of(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        self.check(x, w)?;
        if let Some(b) = bias
            && b.len() != self.out_channels
        {
            bail!(
                "conv_transpose3d: {} bias values for {} output channels",
                b.len(),
                self.out_channels
            );
        }
        Ok((CpuStorage::F32(self.forward(x, w, bias)), self.shape()))
    }

    fn grad_tensors(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let (dx, dw) = with_f32(x, |xv| {
            with_f32(w, |wv| {
                self.check(xv, wv)?;
                with_f32(grad, |gv| {
                    if gv.len() != self.shape().elem_count() {
                        bail!("conv_transpose3d: output gradient of {} values", gv.len());
                    }
                    Ok(self.grads(xv, wv, gv))
                })
            })
        })?;
        Ok((
            Tensor::from_vec(dx, x.shape(), x.device())?,
            Tensor::from_vec(dw, w.shape(), w.device())?,
        ))
    }
}

impl candle_core::CustomOp2 for Patches {
    fn name(&self) -> &'static str {
        "cwseg-conv-transpose3d-patches"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output_of((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grad_tensors(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl candle_core::CustomOp3 for Patches {
    fn name(&self) -> &'static str {
        "cwseg-conv-transpose3d-patches-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output_of((s1, l1), (s2, l2), Some(f32_slice(s3, l3)?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grad_tensors(x, w, grad)?;
        let db = channel_sums(grad)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
