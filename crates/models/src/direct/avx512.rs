//! AVX-512 micro-kernels of the direct convolution (`direct.rs`), used when the CPU has
//! AVX-512F (checked at run time); elsewhere the `gemm` path runs.
//!
//! - [`forward_tile`]: `y[o, v] = Σ_c Σ_t w[o, c, t] · xp[c, q(v) + off(t)]` for 3 chunks of 16
//!   output voxels (a row's, masked at its end, or packed across narrow rows) and 8 output
//!   channels at a time: 24 accumulators, 3 vector loads of the padded input and 8 weight
//!   broadcasts per (c, t) for 24 fused multiply-adds (measured against 4 × 6, 6 × 4 and 12 × 2:
//!   219 against 205, 205 and 180 GFLOP/s on 2×32×64³). Input channels are taken in blocks
//!   whose input rows stay in L1 while every block of 8 output channels passes over them.
//! - [`weight_grad_tile`]: `dW[k, o] += Σ_i xp[k-th (c, t) row][q0 + i] · dyᵀ[i, o]` over a tile
//!   of padded offsets, vectorised over 16 output channels (the output gradient is transposed
//!   per tile, so no horizontal sum is needed): 2 vectors of output channels × 12 (c, t) rows,
//!   24 accumulators, 2 vector loads and 12 broadcasts per voxel.
//!
//! The input is padded in slabs: a few output planes' padded input planes (with the kernel's
//! halo), about 1 MiB and at least one output plane's worth (C × (1 + halo) × Hp × Wp), in a
//! buffer each worker thread keeps across calls (it grows to the largest slab seen), so the
//! padded volume is never allocated (no page faults) and the slab is in L2 while the
//! micro-kernels read it.
//!
//! Every pointer is derived from buffers sized from the geometry; each kernel states what it
//! reads and writes.

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::{Direct, Shared};

/// Output channels per forward block.
const FORWARD_CHANNELS: usize = 8;
/// Chunks (of 16 voxels) per forward micro-tile.
const FORWARD_CHUNKS: usize = 3;
/// (c, t) rows per weight-gradient block.
const GRAD_ROWS: usize = 12;

/// 16 consecutive voxels of one output row: padded input offset of the first one (within a
/// channel of the sample), output offset (within a channel of the sample's output) and which
/// of the 16 lanes are voxels. A mask of 0 makes a chunk a no-op (loads nothing, stores nothing).
#[derive(Debug, Clone, Copy, Default)]
struct Chunk {
    input: usize,
    output: usize,
    mask: u16,
}

/// Whether this CPU runs the kernels of this module.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Values of a slab, about (2^18 values = 1 MiB, within L2).
const SLAB_VALUES: usize = 1 << 18;

thread_local! {
    /// This worker thread's slab of padded input planes, reused across calls.
    static SLAB: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Direct {
    /// Slabs `(sample, z0, planes)`: groups of consecutive output planes whose padded input
    /// (`planes + dil·(kd − 1)` planes of every channel) fits [`SLAB_VALUES`], at least 16 in
    /// all when the volume allows (both threads busy to the end).
    fn slabs(&self) -> Vec<(usize, usize, usize)> {
        let [od, _, _] = self.output();
        let [_, hp, wp] = self.padded();
        let halo = self.dilation[0] * (self.kernel[0] - 1);
        let plane = self.input[0] * hp * wp;
        let fit = (SLAB_VALUES / plane.max(1)).saturating_sub(halo);
        let spread = (self.samples * od / 16).max(1);
        let planes = fit.min(spread).clamp(1, od.max(1));
        let mut v = Vec::new();
        for n in 0..self.samples {
            for z0 in (0..od).step_by(planes) {
                v.push((n, z0, planes.min(od - z0)));
            }
        }
        v
    }

    /// Values of one channel of a slab of `planes` output planes.
    fn slab_channel(&self, planes: usize) -> usize {
        let [_, hp, wp] = self.padded();
        (planes + self.dilation[0] * (self.kernel[0] - 1)) * hp * wp
    }

    /// Fills `buf` (C × span × Hp × Wp) with the padded planes `z0 .. z0 + span` of one
    /// sample `x` (C × D × H × W), every value written (zeros in the padding).
    fn pad_slab(&self, x: &[f32], z0: usize, buf: &mut [f32]) {
        let [c_n, d, h, w] = self.input;
        let [_, hp, wp] = self.padded();
        let [pd, ph, pw] = self.padding;
        let span = buf.len() / (c_n * hp * wp).max(1);
        for (c, channel) in buf.chunks_exact_mut(span * hp * wp).enumerate() {
            for (i, plane) in channel.chunks_exact_mut(hp * wp).enumerate() {
                let Some(z) = (z0 + i).checked_sub(pd).filter(|&z| z < d) else {
                    plane.fill(0.0);
                    continue;
                };
                for (py, row) in plane.chunks_exact_mut(wp).enumerate() {
                    let Some(y) = py.checked_sub(ph).filter(|&y| y < h) else {
                        row.fill(0.0);
                        continue;
                    };
                    row[..pw].fill(0.0);
                    row[pw..pw + w].copy_from_slice(&x[((c * d + z) * h + y) * w..][..w]);
                    row[pw + w..].fill(0.0);
                }
            }
        }
    }

    /// The slab of sample `n` (of all samples' input `x`) for output planes `z0 ..
    /// z0 + planes`, padded into `buf` (grown if needed): the slab and its channel length.
    fn fill_slab<'b>(
        &self,
        buf: &'b mut Vec<f32>,
        x: &[f32],
        n: usize,
        z0: usize,
        planes: usize,
    ) -> (&'b [f32], usize) {
        let sample: usize = self.input.iter().product();
        let sv = self.slab_channel(planes);
        let len = self.input[0] * sv;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        self.pad_slab(&x[n * sample..][..sample], z0, &mut buf[..len]);
        (&buf[..len], sv)
    }

    /// One output plane in chunks of 16 lanes, input offsets within a slab whose first plane
    /// is the output plane's, and whether they are packed. Rows of at least 16 voxels (or whose
    /// padding is wider than the row): chunks of up to 16 voxels of a row, lane `l` at
    /// `output + l`. Narrower rows: 16 consecutive padded offsets spanning rows, the lanes in
    /// the padding masked off and the others packed (consecutive in the output); e.g. 8³ with
    /// padding 1 uses 80% of the lanes instead of 50%.
    fn plane_chunks(&self) -> (Vec<Chunk>, bool) {
        let [_, oh, ow] = self.output();
        let [_, _, wp] = self.padded();
        let rows = ow as f64 / (16 * ow.div_ceil(16)) as f64;
        let packed = (ow as f64 / wp as f64) > rows;
        let mut v = Vec::new();
        if packed {
            let end = (oh - 1) * wp + ow;
            for q0 in (0..end).step_by(16) {
                let mut mask = 0u16;
                let mut first = None;
                for l in 0..16 {
                    let q = q0 + l;
                    if q < end && q % wp < ow {
                        mask |= 1 << l;
                        first.get_or_insert((q / wp) * ow + q % wp);
                    }
                }
                if let Some(output) = first {
                    v.push(Chunk {
                        input: q0,
                        output,
                        mask,
                    });
                }
            }
        } else {
            for y in 0..oh {
                for x0 in (0..ow).step_by(16) {
                    let lanes = (ow - x0).min(16);
                    v.push(Chunk {
                        input: y * wp + x0,
                        output: y * ow + x0,
                        mask: ((1u32 << lanes) - 1) as u16,
                    });
                }
            }
        }
        (v, packed)
    }

    /// [`Direct::forward`] by [`forward_tile`]: slabs in parallel, micro-tiles of 3 chunks ×
    /// every output channel within a slab.
    pub(super) fn forward_avx512(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        const R: usize = FORWARD_CHANNELS;
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let [_, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let volume: usize = self.output().iter().product();
        let offsets = self.offsets();
        // [o / R][c][t][o % R], zero past the last channel
        let blocks = o_n.div_ceil(R);
        let mut weights = vec![0f32; blocks * c_n * t_n * R];
        for o in 0..o_n {
            for c in 0..c_n {
                for t in 0..t_n {
                    weights[(((o / R) * c_n + c) * t_n + t) * R + o % R] =
                        w[(o * c_n + c) * t_n + t];
                }
            }
        }
        let (row_chunks, packed) = self.plane_chunks();
        // (c, t) steps per block: whole channels, about 128 steps, whose input rows stay in L1
        let k_block = (128 / t_n).clamp(1, c_n.max(1)) * t_n;
        let mut out = vec![0f32; self.samples * o_n * volume];
        let dst = Shared(out.as_mut_ptr());
        self.slabs().par_iter().for_each(|&(n, z0, planes)| {
            SLAB.with_borrow_mut(|buf| {
                let (slab, sv) = self.fill_slab(buf, x, n, z0, planes);
                let taps: Vec<usize> = (0..c_n)
                    .flat_map(|c| offsets.iter().map(move |&off| c * sv + off))
                    .collect();
                let mut tile = [Chunk::default(); FORWARD_CHUNKS];
                let mut filled = 0;
                let chunks = (0..planes).flat_map(|z| {
                    row_chunks.iter().map(move |ch| Chunk {
                        input: z * hp * wp + ch.input,
                        output: (z0 + z) * oh * ow + ch.output,
                        mask: ch.mask,
                    })
                });
                let run = |tile: &[Chunk; FORWARD_CHUNKS]| {
                    // SAFETY: AVX-512F checked by `Backend::best`. A chunk's set lanes are output
                    // voxels of the slab's planes (x < Wo, y < Ho), so every tap reads padded
                    // x + dil·e < Wp in its row, rows < Hp and planes < span of the slab (C·sv
                    // values); the weights hold blocks·C·T·R values; sample n's output is
                    // O·volume values of `out`, a chunk's voxels (packed: consecutive from
                    // `output`) lie in its plane, and each chunk belongs to one tile of one slab.
                    unsafe {
                        forward_tile(
                            slab.as_ptr(),
                            &taps,
                            weights.as_ptr(),
                            o_n,
                            tile,
                            dst.get().add(n * o_n * volume),
                            volume,
                            k_block,
                            packed,
                        );
                    }
                };
                for ch in chunks {
                    tile[filled] = ch;
                    filled += 1;
                    if filled == FORWARD_CHUNKS {
                        run(&tile);
                        filled = 0;
                    }
                }
                if filled > 0 {
                    tile[filled..].fill(Chunk::default());
                    run(&tile);
                }
            });
        });
        out
    }

    /// [`Direct::weight_grad`] by [`weight_grad_tile`] over tiles of padded offsets within
    /// slabs; the slabs in 16 fixed groups, each summed in order, then the groups in order.
    pub(super) fn weight_grad_avx512(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let k_n = c_n * t_n;
        let o_pad = o_n.next_multiple_of(16);
        let [_, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let volume: usize = self.output().iter().product();
        let offsets = self.offsets();
        // the transposed gradient tile (len × o_pad) within 32 KiB (L1)
        let len_max = (8192 / o_pad).clamp(16, 1024);
        let slabs = self.slabs();
        let group = slabs.len().div_ceil(16).max(1);
        let partials: Vec<Vec<f32>> = slabs
            .par_chunks(group)
            .map(|chunk| {
                let mut acc = vec![0f32; k_n * o_pad];
                let mut dyt = vec![0f32; len_max * o_pad];
                let mut rows: Vec<*const f32> = vec![std::ptr::null(); k_n];
                SLAB.with_borrow_mut(|buf| {
                    for &(n, z0, planes) in chunk {
                        let (slab, sv) = self.fill_slab(buf, x, n, z0, planes);
                        // padded offsets (whole volume) of the slab's output voxels
                        let base = z0 * hp * wp;
                        let end = base + (planes - 1) * hp * wp + (oh - 1) * wp + ow;
                        for q0 in (base..end).step_by(len_max) {
                            let q1 = (q0 + len_max).min(end);
                            let len = q1 - q0;
                            dyt[..len * o_pad].fill(0.0);
                            self.runs(q0, q1, |q, at, count| {
                                for o in 0..o_n {
                                    let src = &dy[(n * o_n + o) * volume + at..][..count];
                                    for (i, &v) in src.iter().enumerate() {
                                        dyt[(q - q0 + i) * o_pad + o] = v;
                                    }
                                }
                            });
                            for c in 0..c_n {
                                for (t, &off) in offsets.iter().enumerate() {
                                    // in bounds: the last offset q1 − 1 − base + off(t) is
                                    // within the slab's channel
                                    rows[c * t_n + t] =
                                        slab[c * sv + q0 - base + off..][..len].as_ptr();
                                }
                            }
                            // SAFETY: AVX-512F checked by `Backend::best`; each row was
                            // sliced to `len` values above; dyt holds len_max·o_pad ≥
                            // len·o_pad values, acc k_n·o_pad.
                            unsafe {
                                weight_grad_tile(&rows, len, dyt.as_ptr(), o_pad, acc.as_mut_ptr());
                            }
                        }
                    }
                });
                acc
            })
            .collect();
        // the groups in order, for every entry (in parallel over entries, the same bits);
        // (C·T, O_pad) → (O, C·T) = (O, C, kd, kh, kw)
        let mut total = vec![0f32; k_n * o_pad];
        total
            .par_chunks_mut(o_pad)
            .enumerate()
            .for_each(|(k, row)| {
                for p in &partials {
                    for (a, b) in row.iter_mut().zip(&p[k * o_pad..][..o_pad]) {
                        *a += b;
                    }
                }
            });
        let mut out = vec![0f32; o_n * k_n];
        out.par_chunks_mut(k_n).enumerate().for_each(|(o, row)| {
            for (k, v) in row.iter_mut().enumerate() {
                *v = total[k * o_pad + o];
            }
        });
        out
    }
}

/// One forward micro-tile: the outputs of `chunks` for every output channel.
///
/// `xp`: the padded input; `taps[k]`: the offset of (c, t) = (k / T, k % T) from a voxel's own
/// padded offset, `c·vp + off(t)`; `w`: weights packed as `[o / 8][k][o % 8]` with zeros for
/// the channels past `o_n`; `y`: the sample's output, `o_n` channels of `volume` values. The
/// (c, t) steps are summed in blocks of `k_block`; the output is initialised by the first
/// block and read back by the next ones. `packed`: a chunk's set lanes are consecutive output
/// voxels from `output` (compressed stores, expanding loads), else lane `l` is voxel
/// `output + l`.
///
/// # Safety
/// The CPU has AVX-512F. For every chunk with a non-zero mask and every set lane `l`:
/// `xp + input + taps[k] + l` lies in the input for every k, and `y + o·volume + output + l`
/// (packed: `+ i` for the i-th set lane) in the output for all `o < o_n`; `w` holds
/// `ceil(o_n / 8)·taps.len()·8` values. No other thread writes those output voxels.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_tile(
    xp: *const f32,
    taps: &[usize],
    w: *const f32,
    o_n: usize,
    chunks: &[Chunk; FORWARD_CHUNKS],
    y: *mut f32,
    volume: usize,
    k_block: usize,
    packed: bool,
) {
    const R: usize = FORWARD_CHANNELS;
    const V: usize = FORWARD_CHUNKS;
    let k_n = taps.len();
    let blocks = o_n.div_ceil(R);
    let masks: [__mmask16; V] = std::array::from_fn(|j| chunks[j].mask);
    let base: [*const f32; V] = std::array::from_fn(|j| xp.wrapping_add(chunks[j].input));
    let mut k0 = 0;
    while k0 < k_n {
        let k1 = (k0 + k_block).min(k_n);
        for ob in 0..blocks {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            if k0 > 0 {
                for (r, row) in acc.iter_mut().enumerate() {
                    let o = ob * R + r;
                    if o < o_n {
                        for (j, a) in row.iter_mut().enumerate() {
                            // SAFETY: voxel run of a chunk in channel o (caller's contract).
                            *a = unsafe {
                                let at = y.add(o * volume + chunks[j].output);
                                if packed {
                                    _mm512_maskz_expandloadu_ps(masks[j], at)
                                } else {
                                    _mm512_maskz_loadu_ps(masks[j], at)
                                }
                            };
                        }
                    }
                }
            }
            // SAFETY: weights of block ob (caller's contract on `w`'s size).
            let wb = unsafe { w.add(ob * k_n * R) };
            for (k, &off) in (k0..k1).zip(&taps[k0..k1]) {
                // SAFETY: the 8 weights of (ob, k).
                let wt: [__m512; R] =
                    std::array::from_fn(|r| unsafe { _mm512_set1_ps(*wb.add(k * R + r)) });
                for j in 0..V {
                    // SAFETY: masked lanes lie in the padded input (caller's contract);
                    // unset lanes are not read.
                    let x = unsafe { _mm512_maskz_loadu_ps(masks[j], base[j].wrapping_add(off)) };
                    for r in 0..R {
                        acc[r][j] = _mm512_fmadd_ps(wt[r], x, acc[r][j]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let o = ob * R + r;
                if o < o_n {
                    for (j, a) in row.iter().enumerate() {
                        // SAFETY: as the loads above; this tile alone writes these voxels.
                        unsafe {
                            let at = y.add(o * volume + chunks[j].output);
                            if packed {
                                _mm512_mask_compressstoreu_ps(at, masks[j], *a);
                            } else {
                                _mm512_mask_storeu_ps(at, masks[j], *a);
                            }
                        }
                    }
                }
            }
        }
        k0 = k1;
    }
}

/// Adds one tile's weight gradient to `acc` (`k_n × o_pad`, row `k = c·T + t`).
///
/// `rows[k]`: pointer to `xp[c, q0 + off(t)]` for the tile's first padded offset `q0`, valid for
/// `len` values; `dyt`: the tile's output gradient transposed, `len × o_pad` (zero at offsets in
/// the padding and for channels past the real ones); `o_pad` a multiple of 16.
///
/// # Safety
/// The CPU has AVX-512F; every `rows[k]` is readable for `len` values, `dyt` for `len·o_pad`,
/// `acc` writable for `rows.len()·o_pad`.
#[target_feature(enable = "avx512f")]
unsafe fn weight_grad_tile(
    rows: &[*const f32],
    len: usize,
    dyt: *const f32,
    o_pad: usize,
    acc: *mut f32,
) {
    const K: usize = GRAD_ROWS;
    let k_n = rows.len();
    let vectors = o_pad / 16;
    let mut k0 = 0;
    while k0 < k_n {
        let kc = (k_n - k0).min(K);
        // rows past the end repeat the last one; their sums are not stored
        let p: [*const f32; K] = std::array::from_fn(|r| rows[k0 + r.min(kc - 1)]);
        let mut v0 = 0;
        while v0 < vectors {
            if vectors - v0 >= 2 {
                // SAFETY: forwarded contract.
                unsafe { grad_block::<2>(&p, kc, len, dyt, o_pad, v0, acc.add(k0 * o_pad)) };
                v0 += 2;
            } else {
                // SAFETY: forwarded contract.
                unsafe { grad_block::<1>(&p, kc, len, dyt, o_pad, v0, acc.add(k0 * o_pad)) };
                v0 += 1;
            }
        }
        k0 += kc;
    }
}

/// `NV` vectors of output channels from vector `v0` × the 12 rows `p`, of which the first `kc`
/// are stored.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn grad_block<const NV: usize>(
    p: &[*const f32; GRAD_ROWS],
    kc: usize,
    len: usize,
    dyt: *const f32,
    o_pad: usize,
    v0: usize,
    acc: *mut f32,
) {
    let mut s = [[_mm512_setzero_ps(); GRAD_ROWS]; NV];
    for i in 0..len {
        // SAFETY: row i of dyt, vectors v0..v0 + NV (caller's contract).
        let d: [__m512; NV] =
            std::array::from_fn(|v| unsafe { _mm512_loadu_ps(dyt.add(i * o_pad + (v0 + v) * 16)) });
        for r in 0..GRAD_ROWS {
            // SAFETY: value i of row r (caller's contract).
            let x = unsafe { _mm512_set1_ps(*p[r].add(i)) };
            for v in 0..NV {
                s[v][r] = _mm512_fmadd_ps(x, d[v], s[v][r]);
            }
        }
    }
    for r in 0..kc {
        for (v, sv) in s.iter().enumerate() {
            // SAFETY: row r of acc, vector v0 + v (caller's contract).
            unsafe {
                let a = acc.add(r * o_pad + (v0 + v) * 16);
                _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), sv[r]));
            }
        }
    }
}
