//! AVX2 + FMA micro-kernels of the direct convolution (`direct.rs`), used when the CPU has
//! both but not AVX-512F (checked at run time); the slab drivers of `slab.rs` call them.
//!
//! - [`forward_tile`]: `y[o, v] = Σ_c Σ_t w[o, c, t] · xp[c, q(v) + off(t)]` for 2 chunks of 8
//!   output voxels of a row and 6 output channels at a time: 12 accumulators, 2 vector loads of
//!   the padded input and 6 weight broadcasts per (c, t) for 12 fused multiply-adds, 15 of the
//!   16 ymm registers (3 chunks × 4 channels needs all 16, and the compiler then spilled
//!   accumulators to the stack inside the loop). AVX2 has no expanding loads or compressing stores, so chunks never
//!   span rows; the input is read unmasked (lanes past a row's end read the padding or the
//!   next row, within the slab and its slack, and are dropped), the output stored masked
//!   only for a row's last, partial chunk.
//! - [`weight_grad_tile`]: `dW[k, o] += Σ_i xp[k-th (c, t) row][q0 + i] · dyᵀ[i, o]`,
//!   vectorised over 8 output channels: 2 vectors of output channels × 6 (c, t) rows, 12
//!   accumulators, 2 vector loads and 6 broadcasts per voxel.
//!
//! Every pointer is derived from buffers sized from the geometry; each kernel states what it
//! reads and writes.

use std::arch::x86_64::*;

use super::slab::{Chunk, ForwardArgs, Kernels};

/// Output channels per forward block.
const FORWARD_CHANNELS: usize = 6;
/// Chunks (of 8 voxels) per forward micro-tile.
const FORWARD_CHUNKS: usize = 2;
/// (c, t) rows per weight-gradient block.
const GRAD_ROWS: usize = 6;

/// The shapes and entry points of this module's micro-kernels, for the slab drivers.
pub(super) const KERNELS: Kernels = Kernels {
    lanes: 8,
    packed: false,
    channels: FORWARD_CHANNELS,
    chunks: FORWARD_CHUNKS,
    // 256 KiB (the EPYC it was tuned on has 512 KiB of L2 per core)
    slab_values: 1 << 16,
    forward,
    weight_grad: weight_grad_tile,
};

/// Whether this CPU runs the kernels of this module.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// The lane mask of a chunk's first `n` lanes as AVX2 wants it (sign bit set per lane).
#[target_feature(enable = "avx2")]
fn lane_mask(mask: u16) -> __m256i {
    let bits = _mm256_set1_epi32(i32::from(mask));
    let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    _mm256_cmpeq_epi32(_mm256_and_si256(bits, lanes), lanes)
}

/// One forward micro-tile: the outputs of 1 or 2 `chunks` for every output channel (the
/// instance for their number).
///
/// # Safety
/// As [`forward_tile`]'s.
#[target_feature(enable = "avx2,fma")]
unsafe fn forward(args: &ForwardArgs<'_>, chunks: &[Chunk]) {
    // SAFETY: forwarded contract.
    unsafe {
        match chunks {
            [a] => forward_tile::<1>(args, &[*a]),
            [a, b] => forward_tile::<2>(args, &[*a, *b]),
            _ => unreachable!("the slab drivers cut tiles of 1 to {FORWARD_CHUNKS} chunks"),
        }
    }
}

/// The outputs of `V` row chunks of up to 8 voxels for every output channel: `y[o, v] =
/// Σ_steps w[o, k] · xp[input + offset + l]` ([`ForwardArgs`] describes the operands;
/// `packed` must be false, as [`KERNELS`] says).
///
/// # Safety
/// The CPU has AVX2 and FMA. For every chunk, `xp + input + offset + l` is readable for every
/// step and every lane `l < 8` (set or not: the slab's slack covers a row's end), and for
/// every set lane `y + o·volume + output + l` lies in the output for all `o < o_n`; set lanes
/// are the first ones; `w` holds `ceil(o_n / 6)·weight_rows·6` values and every step's `k <
/// weight_rows`. No other thread writes those output voxels.
#[target_feature(enable = "avx2,fma")]
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
    debug_assert!(!packed, "AVX2 chunks are never packed");
    let k_n = steps.len();
    let blocks = o_n.div_ceil(R);
    let full: [bool; V] = std::array::from_fn(|j| chunks[j].mask == 0xff);
    let masks: [__m256i; V] = std::array::from_fn(|j| lane_mask(chunks[j].mask));
    let base: [*const f32; V] = std::array::from_fn(|j| xp.wrapping_add(chunks[j].input));
    let mut k0 = 0;
    while k0 < k_n {
        let k1 = (k0 + k_block).min(k_n);
        for ob in 0..blocks {
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            if k0 > 0 {
                for (r, row) in acc.iter_mut().enumerate() {
                    let o = ob * R + r;
                    if o < o_n {
                        for (j, a) in row.iter_mut().enumerate() {
                            // SAFETY: set lanes of a chunk in channel o (caller's contract);
                            // a full chunk's 8 lanes are all set.
                            *a = unsafe {
                                let at = y.add(o * volume + chunks[j].output);
                                if full[j] {
                                    _mm256_loadu_ps(at)
                                } else {
                                    _mm256_maskload_ps(at, masks[j])
                                }
                            };
                        }
                    }
                }
            }
            // SAFETY: weights of block ob (caller's contract on `w`'s size).
            let wb = unsafe { w.add(ob * weight_rows * R) };
            for step in &steps[k0..k1] {
                // SAFETY: 8 lanes from each chunk's tap are readable (caller's contract).
                let x: [__m256; V] = std::array::from_fn(|j| unsafe {
                    _mm256_loadu_ps(base[j].wrapping_add(step.offset))
                });
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: weight r of (ob, k).
                    let wt = unsafe { _mm256_broadcast_ss(&*wb.add(step.k * R + r)) };
                    for (a, &xj) in row.iter_mut().zip(&x) {
                        *a = _mm256_fmadd_ps(wt, xj, *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let o = ob * R + r;
                if o < o_n {
                    for (j, a) in row.iter().enumerate() {
                        // SAFETY: as the loads above; this tile alone writes these voxels. A
                        // chunk with no set lane stores nothing.
                        unsafe {
                            let at = y.add(o * volume + chunks[j].output);
                            if full[j] {
                                _mm256_storeu_ps(at, *a);
                            } else if chunks[j].mask != 0 {
                                _mm256_maskstore_ps(at, masks[j], *a);
                            }
                        }
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
/// a multiple of 8.
///
/// # Safety
/// The CPU has AVX2 and FMA; every `rows[i]` is readable for `len` values, `dyt` for
/// `len·o_pad`, `acc` writable for `(ks[i] + 1)·o_pad` values; `ks` as long as `rows`.
#[target_feature(enable = "avx2,fma")]
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
    let vectors = o_pad / 8;
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

/// `NV` vectors of output channels from vector `v0` × the 6 rows `p`, of which the first `kc`
/// are stored (row r of the block at `dst[r]`).
#[target_feature(enable = "avx2,fma")]
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
    let mut s = [[_mm256_setzero_ps(); GRAD_ROWS]; NV];
    for i in 0..len {
        // SAFETY: row i of dyt, vectors v0..v0 + NV (caller's contract).
        let d: [__m256; NV] =
            std::array::from_fn(|v| unsafe { _mm256_loadu_ps(dyt.add(i * o_pad + (v0 + v) * 8)) });
        for r in 0..GRAD_ROWS {
            // SAFETY: value i of row r (caller's contract).
            let x = unsafe { _mm256_broadcast_ss(&*p[r].add(i)) };
            for v in 0..NV {
                s[v][r] = _mm256_fmadd_ps(x, d[v], s[v][r]);
            }
        }
    }
    for r in 0..kc {
        for (v, sv) in s.iter().enumerate() {
            // SAFETY: row r of acc, vector v0 + v (caller's contract).
            unsafe {
                let a = dst[r].add((v0 + v) * 8);
                _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), sv[r]));
            }
        }
    }
}
