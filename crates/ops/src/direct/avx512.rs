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
//! The input is padded in slabs (`slab.rs`), each in L2 while the micro-kernels read it.
//!
//! Every pointer is derived from buffers sized from the geometry; each kernel states what it
//! reads and writes.

use std::arch::x86_64::*;

use super::slab::{Chunk, Kernels, TILE_CHUNKS};

/// Output channels per forward block.
const FORWARD_CHANNELS: usize = 8;
/// Chunks (of 16 voxels) per forward micro-tile.
const FORWARD_CHUNKS: usize = TILE_CHUNKS;
/// (c, t) rows per weight-gradient block.
const GRAD_ROWS: usize = 12;

/// The shapes and entry points of this module's micro-kernels, for the slab drivers.
pub(super) const KERNELS: Kernels = Kernels {
    lanes: 16,
    packed: true,
    channels: FORWARD_CHANNELS,
    chunks: FORWARD_CHUNKS,
    // 1 MiB (the Xeon it was tuned on has 2 MiB of L2 per core)
    slab_values: 1 << 18,
    forward: forward_tile,
    weight_grad: weight_grad_tile,
};

/// Whether this CPU runs the kernels of this module.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
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
