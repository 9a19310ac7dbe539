//! The direct convolution on channels-last operands for the small deep maps, with AVX-512F:
//! 8³ maps, 16³ maps with long reductions, and the weight gradient of every 16³ map
//! (`Direct::channels_last_pays`, `Direct::channels_last_grad_pays`). The row kernels of
//! `avx512.rs` vectorise over the voxels of a row and waste lanes on rows of 8 voxels, and
//! stream every weight once per tile of 48 voxels; here the vectors run over output
//! channels, as oneDNN's blocked layouts do: the input is padded channels-last, `xp[q, c]`
//! with `q = z·Hp·Wp + y·Wp + x`, and a block of 8 output voxels × 48 output channels keeps 24
//! accumulators, with per (tap, input channel) 3 weight vectors and 8 broadcast inputs for 24
//! fused multiply-adds:
//!
//! `Y[v, o] = Σ_t Σ_c xp[q(v) + off(t), c] · W[o, c, t]`
//!
//! over the taps live for the block's rows (`live.rs`), in blocks of input channels whose
//! weights stay in L2 while every voxel block passes over them; the output is made
//! channels-last and transposed back to `(O, Do, Ho, Wo)`. The input gradient is this
//! convolution of the output gradient with the flipped, transposed kernel (as for the row
//! kernels). The weight gradient, `dW[o, c, t] = Σ_v xp[q(v) + off(t), c] · dY[v, o]`, keeps
//! 6 input channels × 64 output channels in 24 accumulators over every voxel of every sample
//! whose row the tap reads inside the input (4 vectors of the channels-last output gradient
//! and 6 broadcast inputs per voxel), one (64 output, 6 input channels) per work item over
//! every tap, so that its slice of the output gradient stays in L2: each weight is summed by
//! one item in voxel order, the same bits for any thread count.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::live::has;
use super::{Direct, Shared};
use crate::fused::zeros;

/// Output voxels per block.
const VOXELS: usize = 8;
/// Output channels per group (3 vectors of 16).
const GROUP: usize = 48;

/// A block of up to 8 output voxels of one sample: their padded offsets (unused lanes repeat
/// the last voxel), their indices in the output, how many there are, and the taps live for
/// their rows.
struct VoxelBlock {
    q: [usize; VOXELS],
    out: [usize; VOXELS],
    count: usize,
    taps: Vec<usize>,
}

impl Direct {
    /// Every sample padded channels-last: `(N, Dp·Hp·Wp, C)`.
    fn pad_channels_last(&self, x: &[f32]) -> Vec<f32> {
        let [c_n, d, h, w] = self.input;
        let [dp, hp, wp] = self.padded();
        let [pd, ph, pw] = self.padding;
        let rows = dp * hp * wp;
        let mut out = zeros(self.samples * rows * c_n);
        out.par_chunks_mut(rows * c_n)
            .zip(x.par_chunks(c_n * d * h * w))
            .for_each(|(o, s)| {
                for z in 0..d {
                    for y in 0..h {
                        let row = ((z + pd) * hp + y + ph) * wp + pw;
                        for i in 0..w {
                            let dst = &mut o[(row + i) * c_n..][..c_n];
                            for (c, v) in dst.iter_mut().enumerate() {
                                *v = s[((c * d + z) * h + y) * w + i];
                            }
                        }
                    }
                }
            });
        out
    }

    /// The output voxels of a sample in blocks of 8 (in order, across rows), each with the
    /// taps live for the rows it covers.
    fn voxel_blocks(&self) -> Vec<VoxelBlock> {
        let [od, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let voxels: Vec<(usize, usize, usize)> = (0..od)
            .flat_map(|z| (0..oh).flat_map(move |y| (0..ow).map(move |x| (z, y, x))))
            .collect();
        voxels
            .chunks(VOXELS)
            .map(|block| {
                let (mut planes, mut rows) = (0, 0);
                for &(z, y, _) in block {
                    planes |= self.live_planes(z);
                    rows |= self.live_axis(1, y);
                }
                let pos = |i: usize| {
                    let (z, y, x) = block[i.min(block.len() - 1)];
                    ((z * hp + y) * wp + x, (z * oh + y) * ow + x)
                };
                VoxelBlock {
                    q: std::array::from_fn(|i| pos(i).0),
                    out: std::array::from_fn(|i| pos(i).1),
                    count: block.len(),
                    taps: self.live_taps(planes, rows),
                }
            })
            .collect()
    }

    /// [`Direct::forward`] on channels-last operands (the module's doc).
    pub(super) fn forward_channels_last(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let volume: usize = self.output().iter().product();
        let rows: usize = self.padded().iter().product();
        let xp = self.pad_channels_last(x);
        let o_pad = o_n.next_multiple_of(GROUP);
        let groups = o_pad / GROUP;
        let packed = self.pack_groups(w);
        let offsets = self.offsets();
        let blocks = self.voxel_blocks();
        // input channels per pass: their weights (T × C_b × 48) within 256 KiB
        let c_block = ((1 << 16) / (t_n * GROUP)).clamp(1, c_n);
        let mut ycl = zeros(self.samples * volume * o_pad);
        let dst = Shared(ycl.as_mut_ptr());
        let items: Vec<(usize, usize)> = (0..self.samples)
            .flat_map(|n| (0..groups).map(move |g| (n, g)))
            .collect();
        items.par_iter().for_each(|&(n, g)| {
            let vectors = (o_n - g * GROUP).div_ceil(16).min(GROUP / 16);
            let xs = &xp[n * rows * c_n..][..rows * c_n];
            let wg = &packed[g * t_n * c_n * GROUP..][..t_n * c_n * GROUP];
            for c0 in (0..c_n).step_by(c_block) {
                let c1 = (c0 + c_block).min(c_n);
                for b in &blocks {
                    let args = BlockArgs {
                        xp: xs.as_ptr(),
                        c_n,
                        channels: (c0, c1),
                        q: &b.q,
                        taps: &b.taps,
                        offsets: &offsets,
                        w: wg.as_ptr(),
                        // SAFETY: the rows of sample n, group g's columns, inside `ycl`
                        y: unsafe { dst.get().add(n * volume * o_pad + g * GROUP) },
                        out: &b.out,
                        count: b.count,
                        o_pad,
                        accumulate: c0 > 0,
                    };
                    // SAFETY: `channels_last_pays` asked for AVX-512F (the backend); every
                    // block's voxel reads `q + off(t) < Dp·Hp·Wp` rows of `xs` for its live
                    // taps (output voxels are within the padded input less the kernel's
                    // reach), channels c < C; the weights hold T·C·48 values; the output rows
                    // `out[i] < volume`, columns within the group's 48 of `o_pad`; no other
                    // item writes this group of this sample.
                    unsafe {
                        match vectors {
                            1 => block::<1>(&args),
                            2 => block::<2>(&args),
                            _ => block::<3>(&args),
                        }
                    }
                }
            }
        });
        self.channels_first(&ycl, o_pad)
    }

    /// The weights `(O, C, T)` in groups of 48 output channels, `[group][t][c][48]`, zero past
    /// the last channel.
    fn pack_groups(&self, w: &[f32]) -> Vec<f32> {
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let groups = o_n.div_ceil(GROUP);
        let mut packed = vec![0f32; groups * t_n * c_n * GROUP];
        packed
            .par_chunks_mut(t_n * c_n * GROUP)
            .enumerate()
            .for_each(|(g, dst)| {
                for t in 0..t_n {
                    for c in 0..c_n {
                        for l in 0..GROUP.min(o_n.saturating_sub(g * GROUP)) {
                            dst[(t * c_n + c) * GROUP + l] =
                                w[((g * GROUP + l) * c_n + c) * t_n + t];
                        }
                    }
                }
            });
        packed
    }

    /// `(N, V, O_pad)` → `(N, O, V)`.
    fn channels_first(&self, ycl: &[f32], o_pad: usize) -> Vec<f32> {
        let o_n = self.out_channels;
        let volume: usize = self.output().iter().product();
        let mut out = zeros(self.samples * o_n * volume);
        out.par_chunks_mut(volume)
            .enumerate()
            .for_each(|(no, dst)| {
                let (n, o) = (no / o_n, no % o_n);
                for (v, d) in dst.iter_mut().enumerate() {
                    *d = ycl[(n * volume + v) * o_pad + o];
                }
            });
        out
    }

    /// `(N, O, V)` → `(N, V, O_pad)`, zero past the last channel.
    fn channels_last(&self, dy: &[f32], o_pad: usize) -> Vec<f32> {
        let o_n = self.out_channels;
        let volume: usize = self.output().iter().product();
        let mut out = zeros(self.samples * volume * o_pad);
        out.par_chunks_mut(volume * o_pad)
            .enumerate()
            .for_each(|(n, dst)| {
                for o in 0..o_n {
                    let src = &dy[(n * o_n + o) * volume..][..volume];
                    for (v, &g) in src.iter().enumerate() {
                        dst[v * o_pad + o] = g;
                    }
                }
            });
        out
    }

    /// The voxels whose row tap `t` reads inside the input, all samples: (row of the padded
    /// channels-last input it reads, index in the channels-last output).
    fn tap_voxels(&self, t: usize, off: usize) -> Vec<(usize, usize)> {
        let [od, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let [_, kh, kw] = self.kernel;
        let rows: usize = self.padded().iter().product();
        let (a, b) = (t / (kh * kw), t / kw % kh);
        let mut voxels = Vec::with_capacity(self.samples * od * oh * ow);
        for n in 0..self.samples {
            for z in (0..od).filter(|&z| has(self.live_planes(z), a)) {
                for y in (0..oh).filter(|&y| has(self.live_axis(1, y), b)) {
                    for x in 0..ow {
                        voxels.push((
                            n * rows + (z * hp + y) * wp + x + off,
                            ((n * od + z) * oh + y) * ow + x,
                        ));
                    }
                }
            }
        }
        voxels
    }
}

/// Input channels per weight-gradient item.
const GRAD_CHANNELS: usize = 6;
/// Output channels per weight-gradient block (4 vectors).
const GRAD_OUTPUTS: usize = 64;

impl Direct {
    /// [`Direct::weight_grad`] on channels-last operands (the module's doc).
    pub(super) fn weight_grad_channels_last(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let xp = self.pad_channels_last(x);
        let o_pad = o_n.next_multiple_of(16);
        let dycl = self.channels_last(dy, o_pad);
        let c_blocks = c_n.div_ceil(GRAD_CHANNELS);
        let offsets = self.offsets();
        let voxels: Vec<Vec<(usize, usize)>> = (0..t_n)
            .into_par_iter()
            .map(|t| self.tap_voxels(t, offsets[t]))
            .collect();
        let mut out = vec![0f32; o_n * c_n * t_n];
        let dst = Shared(out.as_mut_ptr());
        // an item is (64 output channels, 6 input channels) over every tap: its slice of the
        // output gradient (V × 64) stays in L2 while the taps pass over it
        let o_blocks = o_pad.div_ceil(GRAD_OUTPUTS);
        (0..o_blocks * c_blocks).into_par_iter().for_each(|item| {
            let (o0, c0) = (
                item / c_blocks * GRAD_OUTPUTS,
                item % c_blocks * GRAD_CHANNELS,
            );
            let kc = GRAD_CHANNELS.min(c_n - c0);
            let vectors = ((o_pad - o0) / 16).min(GRAD_OUTPUTS / 16);
            for (t, voxels) in voxels.iter().enumerate() {
                let args = GradArgs {
                    xp: &xp,
                    c_n,
                    c0,
                    kc,
                    voxels,
                    dy: &dycl,
                    o_pad,
                    o0,
                };
                // SAFETY: `channels_last_pays` asked for AVX-512F (the backend); every voxel's
                // input row `< N·Dp·Hp·Wp` and its channels `c0 .. c0 + 6` are clamped to C
                // inside the kernel; its gradient row holds o_pad ≥ o0 + 16·vectors values.
                let sums = unsafe {
                    match vectors {
                        1 => grad_block::<1>(&args),
                        2 => grad_block::<2>(&args),
                        3 => grad_block::<3>(&args),
                        _ => grad_block::<4>(&args),
                    }
                };
                for (ci, row) in sums.iter().enumerate().take(kc) {
                    for (l, &v) in row.iter().enumerate() {
                        let o = o0 + l;
                        if o < o_n {
                            // SAFETY: weight (o, c0 + ci, t), written by this item alone.
                            unsafe { *dst.get().add((o * c_n + c0 + ci) * t_n + t) = v };
                        }
                    }
                }
            }
        });
        out
    }
}

/// The operands of one weight-gradient block.
struct GradArgs<'a> {
    /// All samples' padded channels-last input.
    xp: &'a [f32],
    c_n: usize,
    /// The block's first input channel and how many (at most 6).
    c0: usize,
    kc: usize,
    /// (input row at the tap, output voxel) of every voxel summed.
    voxels: &'a [(usize, usize)],
    /// The channels-last output gradient, `o_pad` values per voxel.
    dy: &'a [f32],
    o_pad: usize,
    o0: usize,
}

/// `Σ_v xp[row(v), c0 + ci] · dY[v, o0 + l]` for 6 channels × `16·NV` output channels.
///
/// # Safety
/// The CPU has AVX-512F; every voxel's row times `c_n` plus `c0 + kc` is within `xp`, and its
/// output index times `o_pad` plus `o0 + 16·NV` within `dy`.
#[target_feature(enable = "avx512f")]
unsafe fn grad_block<const NV: usize>(a: &GradArgs<'_>) -> [[f32; GRAD_OUTPUTS]; GRAD_CHANNELS] {
    let mut acc = [[_mm512_setzero_ps(); NV]; GRAD_CHANNELS];
    let (xp, dy) = (a.xp.as_ptr(), a.dy.as_ptr());
    for &(row, v) in a.voxels {
        // SAFETY: NV vectors of voxel v's gradient row (caller's contract).
        let d: [__m512; NV] = std::array::from_fn(|k| unsafe {
            _mm512_loadu_ps(dy.add(v * a.o_pad + a.o0 + 16 * k))
        });
        let x_row = xp.wrapping_add(row * a.c_n + a.c0);
        for (ci, r) in acc.iter_mut().enumerate() {
            // SAFETY: channel c0 + min(ci, kc − 1) of the row (caller's contract).
            let x = unsafe { _mm512_set1_ps(*x_row.add(ci.min(a.kc - 1))) };
            for (s, &dv) in r.iter_mut().zip(&d) {
                *s = _mm512_fmadd_ps(x, dv, *s);
            }
        }
    }
    let mut sums = [[0f32; GRAD_OUTPUTS]; GRAD_CHANNELS];
    for (row, r) in sums.iter_mut().zip(&acc) {
        for (k, s) in r.iter().enumerate() {
            // SAFETY: 16 values of the row's 64 (NV ≤ 4).
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(16 * k), *s) };
        }
    }
    sums
}

/// The operands of one voxel block × one group of output channels.
struct BlockArgs<'a> {
    /// The sample's padded channels-last input, `C` values per row.
    xp: *const f32,
    c_n: usize,
    /// Input channels summed by this call.
    channels: (usize, usize),
    /// Padded offsets of the block's voxels.
    q: &'a [usize; VOXELS],
    /// Live taps, and every tap's offset in rows.
    taps: &'a [usize],
    offsets: &'a [usize],
    /// The group's weights, `[t][c][48]`.
    w: *const f32,
    /// Column 0 of the group in the sample's channels-last output (`o_pad` values per voxel).
    y: *mut f32,
    out: &'a [usize; VOXELS],
    count: usize,
    o_pad: usize,
    /// Whether to add to the output (later channel blocks) or to set it (the first).
    accumulate: bool,
}

/// `NV` vectors of 16 output channels × the block's voxels.
///
/// # Safety
/// The CPU has AVX-512F; `xp + (q[i] + offsets[t])·c_n + c` is readable for every lane `i`,
/// live tap `t` and channel `c` of the range; `w + (t·c_n + c)·48 + 16·NV` is readable for
/// the same; `y + out[i]·o_pad + 16·NV` is writable for `i < count`, by this call alone.
#[target_feature(enable = "avx512f")]
unsafe fn block<const NV: usize>(a: &BlockArgs<'_>) {
    let mut acc = [[_mm512_setzero_ps(); NV]; VOXELS];
    if a.accumulate {
        for (i, row) in acc.iter_mut().enumerate().take(a.count) {
            for (v, r) in row.iter_mut().enumerate() {
                // SAFETY: output row out[i], vector v (caller's contract).
                *r = unsafe { _mm512_loadu_ps(a.y.add(a.out[i] * a.o_pad + v * 16)) };
            }
        }
    }
    let (c0, c1) = a.channels;
    for &t in a.taps {
        let off = a.offsets[t];
        // SAFETY: (caller's contract) each lane's input row at this tap, and the tap's weights.
        let base: [*const f32; VOXELS] =
            std::array::from_fn(|i| a.xp.wrapping_add((a.q[i] + off) * a.c_n));
        let wt = a.w.wrapping_add(t * a.c_n * GROUP);
        for c in c0..c1 {
            // SAFETY: the weights of (t, c), NV vectors.
            let wv: [__m512; NV] =
                std::array::from_fn(|v| unsafe { _mm512_loadu_ps(wt.add(c * GROUP + v * 16)) });
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: input channel c of lane i's row.
                let x = unsafe { _mm512_set1_ps(*base[i].add(c)) };
                for (r, &wvv) in row.iter_mut().zip(&wv) {
                    *r = _mm512_fmadd_ps(x, wvv, *r);
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(a.count) {
        for (v, r) in row.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { _mm512_storeu_ps(a.y.add(a.out[i] * a.o_pad + v * 16), *r) };
        }
    }
}
