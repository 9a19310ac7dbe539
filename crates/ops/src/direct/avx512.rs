//! AVX-512 micro-kernels of the direct convolution (`direct.rs`), used when the CPU has
//! AVX-512F (checked at run time); elsewhere the `gemm` path runs.
//!
//! - [`forward_tile`]: `y[o, v] = Σ_c Σ_t w[o, c, t] · xp[c, q(v) + off(t)]` over the tile's
//!   live (c, t) steps for up to 3 chunks of 16 output voxels (a row's, masked at its end, or
//!   packed across narrow rows) and 8 output channels at a time: 24 accumulators, 3 vector
//!   loads of the padded input and 8 weight broadcasts per (c, t) for 24 fused multiply-adds
//!   (measured against 4 × 6, 6 × 4 and 12 × 2: 219 against 205, 205 and 180 GFLOP/s on
//!   2×32×64³), one broadcast live at a time so that 28 of the 32 registers hold them all.
//!   Input channels are taken in blocks whose input rows stay in L1 while every block of 8
//!   output channels passes over them.
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

use super::slab::{Chunk, ForwardArgs, Kernels, TILE_CHUNKS};

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
    forward,
    weight_grad: weight_grad_tile,
};

/// Whether this CPU runs the kernels of this module.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// One forward micro-tile: the outputs of 1 to 3 `chunks` for every output channel (the
/// instance for their number).
///
/// # Safety
/// As [`forward_tile`]'s.
#[target_feature(enable = "avx512f")]
unsafe fn forward(args: &ForwardArgs<'_>, chunks: &[Chunk]) {
    // SAFETY: forwarded contract.
    unsafe {
        match chunks {
            [a] => forward_tile::<1>(args, &[*a]),
            [a, b] => forward_tile::<2>(args, &[*a, *b]),
            [a, b, c] => forward_tile::<3>(args, &[*a, *b, *c]),
            _ => unreachable!("the slab drivers cut tiles of 1 to {FORWARD_CHUNKS} chunks"),
        }
    }
}

/// The outputs of `V` chunks for every output channel: `y[o, v] = Σ_steps w[o, k] · xp[input
/// + offset + l]` ([`ForwardArgs`] describes the operands). `packed`: a chunk's set lanes are
/// consecutive output voxels from `output` (compressed in registers and stored under a mask of
/// their count: Zen 4 microcodes compressing stores to memory), else lane `l` is voxel
/// `output + l`.
///
/// # Safety
/// The CPU has AVX-512F. For every chunk with a non-zero mask and every set lane `l`:
/// `xp + input + offset + l` lies in the input for every step, and `y + o·volume + output + l`
/// (packed: `+ i` for the i-th set lane) in the output for all `o < o_n`; `w` holds
/// `ceil(o_n / 8)·weight_rows·8` values and every step's `k < weight_rows`. No other thread
/// writes those output voxels.
#[target_feature(enable = "avx512f")]
unsafe fn forward_tile<const V: usize>(args: &ForwardArgs<'_>, chunks: &[Chunk; V]) {
    const R: usize = FORWARD_CHANNELS;
    let ForwardArgs {
        xp,
        steps,
        w,
        weight_rows,
        o_n,
        y,
        volume,
        k_block,
        packed,
    } = *args;
    let k_n = steps.len();
    let blocks = o_n.div_ceil(R);
    let masks: [__mmask16; V] = std::array::from_fn(|j| chunks[j].mask);
    // packed chunks: the first popcount(mask) lanes hold the voxels in memory
    let stored: [__mmask16; V] = std::array::from_fn(|j| {
        if packed {
            ((1u32 << masks[j].count_ones()) - 1) as u16
        } else {
            masks[j]
        }
    });
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
                                let v = _mm512_maskz_loadu_ps(
                                    stored[j],
                                    y.add(o * volume + chunks[j].output),
                                );
                                if packed {
                                    _mm512_maskz_expand_ps(masks[j], v)
                                } else {
                                    v
                                }
                            };
                        }
                    }
                }
            }
            // SAFETY: weights of block ob (caller's contract on `w`'s size).
            let wb = unsafe { w.add(ob * weight_rows * R) };
            for step in &steps[k0..k1] {
                // SAFETY: masked lanes lie in the padded input (caller's contract); unset lanes
                // are not read.
                let x: [__m512; V] = std::array::from_fn(|j| unsafe {
                    _mm512_maskz_loadu_ps(masks[j], base[j].wrapping_add(step.offset))
                });
                // one weight broadcast live at a time: 24 accumulators, 3 inputs and 1 weight
                // fit the 32 registers (8 weights live at once spilled an accumulator)
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: weight r of (ob, k).
                    let wt = unsafe { _mm512_set1_ps(*wb.add(step.k * R + r)) };
                    for (a, &xj) in row.iter_mut().zip(&x) {
                        *a = _mm512_fmadd_ps(wt, xj, *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let o = ob * R + r;
                if o < o_n {
                    for (j, a) in row.iter().enumerate() {
                        let v = if packed {
                            _mm512_maskz_compress_ps(masks[j], *a)
                        } else {
                            *a
                        };
                        // SAFETY: as the loads above; this tile alone writes these voxels.
                        unsafe {
                            _mm512_mask_storeu_ps(
                                y.add(o * volume + chunks[j].output),
                                stored[j],
                                v,
                            )
                        };
                    }
                }
            }
        }
        k0 = k1;
    }
}

/// Adds one tile's weight gradient to the rows `ks` of `acc` (`C·T × o_pad`, row
/// `k = c·T + t`).
///
/// `rows[i]`: pointer to `xp[c, q0 + off(t)]` for `(c, t)` of row `ks[i]` and the tile's first
/// padded offset `q0`, valid for `len` values; `dyt`: the tile's output gradient transposed,
/// `len × o_pad` (zero at offsets in the padding and for channels past the real ones); `o_pad`
/// a multiple of 16.
///
/// # Safety
/// The CPU has AVX-512F; every `rows[i]` is readable for `len` values, `dyt` for
/// `len·o_pad`, `acc` writable for `(ks[i] + 1)·o_pad` values; `ks` as long as `rows`.
#[target_feature(enable = "avx512f")]
unsafe fn weight_grad_tile(
    rows: &[*const f32],
    ks: &[usize],
    len: usize,
    dyt: *const f32,
    o_pad: usize,
    acc: *mut f32,
) {
    const K: usize = GRAD_ROWS;
    let k_n = rows.len().min(ks.len());
    let vectors = o_pad / 16;
    let mut k0 = 0;
    while k0 < k_n {
        let kc = (k_n - k0).min(K);
        // rows past the end repeat the last one; their sums are not stored
        let p: [*const f32; K] = std::array::from_fn(|r| rows[k0 + r.min(kc - 1)]);
        let dst: [*mut f32; K] =
            std::array::from_fn(|r| acc.wrapping_add(ks[k0 + r.min(kc - 1)] * o_pad));
        let mut v0 = 0;
        while v0 < vectors {
            if vectors - v0 >= 2 {
                // SAFETY: forwarded contract.
                unsafe { grad_block::<2>(&p, kc, len, dyt, o_pad, v0, &dst) };
                v0 += 2;
            } else {
                // SAFETY: forwarded contract.
                unsafe { grad_block::<1>(&p, kc, len, dyt, o_pad, v0, &dst) };
                v0 += 1;
            }
        }
        k0 += kc;
    }
}

/// `NV` vectors of output channels from vector `v0` × the 12 rows `p`, of which the first `kc`
/// are stored (row r of the block at `dst[r]`).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn grad_block<const NV: usize>(
    p: &[*const f32; GRAD_ROWS],
    kc: usize,
    len: usize,
    dyt: *const f32,
    o_pad: usize,
    v0: usize,
    dst: &[*mut f32; GRAD_ROWS],
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
                let a = dst[r].add((v0 + v) * 16);
                _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), sv[r]));
            }
        }
    }
}
