//! The direct convolution in bf16 on AMX tiles (`Precision::Bf16`, CPUs with AMX-BF16): the
//! input is padded into slabs of channel pairs (`[c / 2][z][y][x][c % 2]`, rounded to bf16),
//! so that one channel pair's 16 consecutive padded offsets at one tap are one 64-byte tile
//! row and 16 pairs are one tile (`tileloadd` with the slab's channel stride); the weights are
//! packed per (16 output channels, tap, 32 input channels) as 16 rows of channel pairs. One
//! micro-tile is 32 output channels × 32 padded offsets in the four accumulator tiles:
//!
//! `C[o, v] += Σ_t Σ_c bf16(w[o, c, t]) · bf16(xp[c, q(v) + off(t)])`, accumulated in f32,
//!
//! with two weight tiles (output channels 0–15, 16–31) and two input tiles (offsets 0–15,
//! 16–31) per (tap, 32 channels): 4 tile loads for 4 tile products of 16 × 16 × 32 (a last
//! block of 16 output channels: 3 loads, 2 products). Each accumulator row is 16 consecutive
//! padded offsets of one output channel: those in the padding are dropped by a compressed
//! store, as in the AVX-512 kernel's packed chunks.
//!
//! The weight gradient `dW[o, c, t] = Σ_q bf16(dy[o, q]) · bf16(xp[c, q + off(t)])` takes
//! input rows from a plain bf16 slab (`[c][z][y][x]`: 32 consecutive offsets are 16 pairs)
//! and the output gradient transposed into pairs of consecutive offsets per output channel;
//! a micro-tile is 32 (or 16) channels × 32 (or 16) output channels, summed over a slab.
//!
//! Measured on one core of the Xeon it was written on (`examples/fma_peak.rs`): 3.06 TFLOP/s
//! for `tdpbf16ps` from registers against 0.10 for `vdpbf16ps` (AVX512_BF16) and about 0.2
//! for f32 FMA: AMX, not AVX512_BF16, is this CPU's bf16 path.

use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{Direct, Shared};
use crate::bf16::bf16_bits;

/// Rows, and f32 columns, of an accumulator tile.
const TILE: usize = 16;
/// Channel pairs per input tile row, at most (64 bytes).
const MAX_PAIRS: usize = 16;
/// Values after a slab (zeros): the last micro-tile reads up to 31 offsets past the last
/// output voxel's taps in the last channel pair.
const SLACK_VOXELS: usize = 2 * TILE;
/// bf16 values of a slab, about (1 MiB: half the L2 of the Xeon it was written on).
const SLAB_VALUES: usize = 1 << 19;

thread_local! {
    /// This worker thread's slab of bf16 channel pairs, reused across calls.
    static SLAB: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// This worker thread's bf16 slab and output-gradient tile of the weight gradient.
    static GRAD_SLAB: RefCell<(Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether the CPU has AVX-512F/BW, AMX-BF16 and AMX-TILE (CPUID leaf 7, EDX bits 22 and 24) and the
/// operating system grants this process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`, asked once).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // the packing loops are compiled for AVX-512F and BW (every AMX CPU so far has both)
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && cpu_has_amx()
            && os_grants_tiles()
    })
}

fn cpu_has_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only if the CPU reports it.
    unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn os_grants_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permitted xstate.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn os_grants_tiles() -> bool {
    false
}

/// The channel layout of a slab: `cp` channels per voxel (the real ones, then zeros),
/// `pairs` channel pairs per input tile row and `groups` tiles across the channels.
#[derive(Debug, Clone, Copy)]
struct Channels {
    cp: usize,
    pairs: usize,
    groups: usize,
}

impl Channels {
    /// Up to 32 channels: one tile of `⌈C/2⌉` pairs; more: tiles of 32, zeros to the last.
    fn new(c: usize) -> Channels {
        let cp = if c <= 2 * MAX_PAIRS {
            c.next_multiple_of(2)
        } else {
            c.next_multiple_of(2 * MAX_PAIRS)
        };
        let pairs = (cp / 2).min(MAX_PAIRS);
        Channels {
            cp,
            pairs,
            groups: cp / (2 * pairs),
        }
    }
}

/// The tile configuration (palette 1): tiles 0–3 accumulators (16 output channels × 16 f32),
/// 4–5 weights (16 output channels × `pairs` channel pairs), 6–7 input (`pairs` channel pairs
/// × 16 padded offsets).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(pairs: usize) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |tile: usize, rows: usize, bytes: usize| {
            c[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + tile] = rows as u8;
        };
        for t in 0..4 {
            set(t, TILE, 4 * TILE);
        }
        for t in 4..6 {
            set(t, TILE, 4 * pairs);
        }
        for t in 6..8 {
            set(t, pairs, 4 * TILE);
        }
        TileConfig(c)
    }

    /// Loads this configuration into the calling thread's tile registers.
    ///
    /// # Safety
    /// AMX is [`available`]; the thread calls `release` before it runs other code that
    /// expects the tiles unconfigured (none does in this crate).
    unsafe fn load(&self) {
        // SAFETY: a valid palette-1 configuration, 64 bytes, 64-aligned.
        unsafe { asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly)) };
    }
}

/// Releases the calling thread's tile state.
///
/// # Safety
/// AMX is [`available`].
unsafe fn release() {
    // SAFETY: AMX is present (caller).
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// One micro-tile: `out[i]` (16 × 16 f32, row = output channel, column = padded offset) for
/// accumulator `i` = (output block `i / 2`, offset half `i % 2`), summed over the (tap,
/// channel group) steps: weight tiles at `w0 + s·w_step` and, without `w1` (one block of
/// output channels: accumulators 2 and 3 zero), `w1 + s·w_step` (rows of
/// `4·pairs` bytes, contiguous), input tiles at `x + x_steps[s]` and 16 pairs further (row
/// stride `4·channel` bytes: one channel pair of the slab).
///
/// # Safety
/// The thread's tiles are configured for `pairs` (`TileConfig::new`); for every step the 16
/// rows of `4·pairs` bytes from `w0`/`w1 + s·w_step` and the `pairs` rows of 128 bytes from
/// `x + x_steps[s]` (stride `4·channel` bytes) are readable.
#[allow(clippy::too_many_arguments)]
unsafe fn micro_tile(
    w0: *const u16,
    w1: Option<*const u16>,
    w_step: usize,
    x: *const u32,
    x_steps: &[usize],
    channel: usize,
    out: &mut [f32; 4 * TILE * TILE],
) {
    // SAFETY: tiles configured (caller); every address below is readable (caller), `out`
    // holds the four 1 KiB accumulators.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for (s, &off) in x_steps.iter().enumerate() {
            let x0 = x.add(off);
            match w1 {
                Some(w1) => asm!(
                    "tileloadd tmm4, [{w0} + {sw}*1]",
                    "tileloadd tmm5, [{w1} + {sw}*1]",
                    "tileloadd tmm6, [{x0} + {sx}*1]",
                    "tileloadd tmm7, [{x1} + {sx}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    w0 = in(reg) w0.add(s * w_step),
                    w1 = in(reg) w1.add(s * w_step),
                    x0 = in(reg) x0,
                    x1 = in(reg) x0.add(TILE),
                    sw = in(reg) w_step / TILE * 2,
                    sx = in(reg) 4 * channel,
                    options(nostack, readonly)
                ),
                // one block of output channels: accumulators 2 and 3 stay zero
                None => asm!(
                    "tileloadd tmm4, [{w0} + {sw}*1]",
                    "tileloadd tmm6, [{x0} + {sx}*1]",
                    "tileloadd tmm7, [{x1} + {sx}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    w0 = in(reg) w0.add(s * w_step),
                    x0 = in(reg) x0,
                    x1 = in(reg) x0.add(TILE),
                    sw = in(reg) w_step / TILE * 2,
                    sx = in(reg) 4 * channel,
                    options(nostack, readonly)
                ),
            }
        }
        let c = out.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(TILE * TILE),
            c2 = in(reg) c.add(2 * TILE * TILE),
            c3 = in(reg) c.add(3 * TILE * TILE),
            s = in(reg) 4 * TILE,
            options(nostack)
        );
    }
}

/// One weight-gradient micro-tile: `out[i]` (16 × 16 f32, row = input channel, column =
/// output channel) for accumulator `i` = (channel block `i / 2`, output block `i % 2`),
/// summed over `steps` runs of 32 padded offsets: input tiles at `x + 32·s` and, if `two_c`,
/// 16 channels further (row stride `2·channel` bytes), gradient tiles at `dy + 16·s·row` and,
/// if `two_o`, 32 values further (rows of offset pairs, stride `2·row` bytes); the
/// accumulators of a missing block stay zero.
///
/// # Safety
/// The thread's tiles are configured for 16 pairs; for every step the 16 (`two_c`: 32)
/// channel rows of 64 bytes from `x + 32·s` (stride `2·channel` bytes) and the 16 rows of 64
/// (`two_o`: 128) bytes from `dy + 16·s·row` (stride `2·row` bytes) are readable.
unsafe fn grad_micro_tile(
    x: *const u16,
    channel: usize,
    dy: *const u16,
    row: usize,
    steps: usize,
    [two_c, two_o]: [bool; 2],
    out: &mut [f32; 4 * TILE * TILE],
) {
    // SAFETY: as `micro_tile`.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for s in 0..steps {
            let x0 = x.add(2 * TILE * s);
            let d0 = dy.add(TILE * s * row);
            let (x1, d1) = (x0.add(TILE * channel), d0.add(2 * TILE));
            let (sx, sd) = (2 * channel, 2 * row);
            match (two_c, two_o) {
                (true, true) => asm!(
                    "tileloadd tmm4, [{x0} + {sx}*1]",
                    "tileloadd tmm5, [{x1} + {sx}*1]",
                    "tileloadd tmm6, [{d0} + {sd}*1]",
                    "tileloadd tmm7, [{d1} + {sd}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    x0 = in(reg) x0, x1 = in(reg) x1, d0 = in(reg) d0, d1 = in(reg) d1,
                    sx = in(reg) sx, sd = in(reg) sd,
                    options(nostack, readonly)
                ),
                (true, false) => asm!(
                    "tileloadd tmm4, [{x0} + {sx}*1]",
                    "tileloadd tmm5, [{x1} + {sx}*1]",
                    "tileloadd tmm6, [{d0} + {sd}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    x0 = in(reg) x0, x1 = in(reg) x1, d0 = in(reg) d0,
                    sx = in(reg) sx, sd = in(reg) sd,
                    options(nostack, readonly)
                ),
                (false, true) => asm!(
                    "tileloadd tmm4, [{x0} + {sx}*1]",
                    "tileloadd tmm6, [{d0} + {sd}*1]",
                    "tileloadd tmm7, [{d1} + {sd}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    x0 = in(reg) x0, d0 = in(reg) d0, d1 = in(reg) d1,
                    sx = in(reg) sx, sd = in(reg) sd,
                    options(nostack, readonly)
                ),
                (false, false) => asm!(
                    "tileloadd tmm4, [{x0} + {sx}*1]",
                    "tileloadd tmm6, [{d0} + {sd}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    x0 = in(reg) x0, d0 = in(reg) d0,
                    sx = in(reg) sx, sd = in(reg) sd,
                    options(nostack, readonly)
                ),
            }
        }
        let c = out.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(TILE * TILE),
            c2 = in(reg) c.add(2 * TILE * TILE),
            c3 = in(reg) c.add(3 * TILE * TILE),
            s = in(reg) 4 * TILE,
            options(nostack)
        );
    }
}

/// Which of 16 consecutive padded offsets are output voxels, and the output offset (within a
/// channel) of the first: the set lanes map to consecutive output voxels.
#[derive(Debug, Clone, Copy)]
struct Run {
    mask: u16,
    first: usize,
}

impl Direct {
    /// [`Direct::forward`] in bf16 on AMX tiles (module doc): slabs in parallel, micro-tiles of
    /// 32 output channels × 32 padded offsets within a slab.
    pub(super) fn forward_amx(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let ch = Channels::new(self.input[0]);
        let o_n = self.out_channels;
        let t_n = self.taps();
        let volume: usize = self.output().iter().product();
        let blocks = o_n.div_ceil(TILE);
        let weights = self.pack_weights_amx(w, ch, blocks);
        let w_step = TILE * ch.pairs * 2;
        let steps = t_n * ch.groups;
        let config = TileConfig::new(ch.pairs);
        let mut out = vec![0f32; self.samples * o_n * volume];
        let dst = Shared(out.as_mut_ptr());
        // slabs sized as the f32 kernels' (bf16 values, twice as many)
        let slab_values = 2 * SLAB_VALUES * self.input[0].max(1) / ch.cp.max(1);
        self.slabs(slab_values)
            .par_iter()
            .for_each(|&(n, z0, planes)| {
                SLAB.with_borrow_mut(|buf| {
                    let (slab, channel) = self.fill_slab_amx(buf, x, n, z0, planes, ch.cp);
                    // input tile of step (t, g): pairs from pairs·g, offset off(t)
                    let x_steps: Vec<usize> = self
                        .offsets()
                        .iter()
                        .flat_map(|&off| (0..ch.groups).map(move |g| g * ch.pairs * channel + off))
                        .collect();
                    let mut acc = [0f32; 4 * TILE * TILE];
                    // SAFETY: AMX is available (the backend is chosen only then).
                    unsafe { config.load() };
                    for (q, runs) in self.runs_amx(z0, planes) {
                        for ob in (0..blocks).step_by(2) {
                            // SAFETY: tiles configured for `pairs` above. Weight tiles: blocks ob
                            // and (if any) ob + 1 < blocks of `steps` steps of w_step values. Input tiles: pair
                            // rows < cp / 2 at offsets q + off(t) + 31 at most: the last output
                            // voxel's last tap (inside the channel) plus 31, within the channel
                            // and the next one or, for the last pair, the slab's SLACK_VOXELS.
                            unsafe {
                                micro_tile(
                                    weights.as_ptr().add(ob * steps * w_step),
                                    (ob + 1 < blocks)
                                        .then(|| weights.as_ptr().add((ob + 1) * steps * w_step)),
                                    w_step,
                                    slab.as_ptr().add(q),
                                    &x_steps,
                                    channel,
                                    &mut acc,
                                );
                                self.store_amx(&acc, &runs, ob, dst.get().add(n * o_n * volume));
                            }
                        }
                    }
                    // SAFETY: AMX is available.
                    unsafe { release() };
                });
            });
        out
    }

    /// The micro-tiles of a slab of `planes` output planes from `z0`: the first padded offset
    /// (within the slab) of every 32, and the runs of its two halves.
    fn runs_amx(&self, z0: usize, planes: usize) -> Vec<(usize, [Run; 2])> {
        let [_, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let plane = hp * wp;
        let end = (planes - 1) * plane + (oh - 1) * wp + ow;
        let run = |q0: usize| {
            let mut r = Run { mask: 0, first: 0 };
            for l in 0..TILE {
                let v = q0 + l;
                let (z, y, x) = (v / plane, v % plane / wp, v % wp);
                if v < end && y < oh && x < ow {
                    if r.mask == 0 {
                        r.first = ((z0 + z) * oh + y) * ow + x;
                    }
                    r.mask |= 1 << l;
                }
            }
            r
        };
        (0..end)
            .step_by(2 * TILE)
            .map(|q| (q, [run(q), run(q + TILE)]))
            .collect()
    }

    /// Writes the micro-tile `acc` (output block ob + k, offset half h at `acc[(2k + h)·256]`,
    /// row = output channel) to the real output channels of one sample's output `y`.
    ///
    /// # Safety
    /// AVX-512F; `y` holds `O·volume` values; each run's set lanes are voxels of its plane no
    /// other thread writes.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_amx(
        &self,
        acc: &[f32; 4 * TILE * TILE],
        runs: &[Run; 2],
        ob: usize,
        y: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let volume: usize = self.output().iter().product();
        for k in 0..2 {
            for r in 0..TILE {
                let o = (ob + k) * TILE + r;
                if o >= self.out_channels {
                    return;
                }
                for (h, run) in runs.iter().enumerate() {
                    if run.mask == 0 {
                        continue;
                    }
                    // SAFETY: row r of accumulator 2k + h; the run's voxels lie in channel o
                    // of the output (caller).
                    unsafe {
                        let v = _mm512_loadu_ps(acc.as_ptr().add(((2 * k + h) * TILE + r) * TILE));
                        let at = y.add(o * volume + run.first);
                        if run.mask == u16::MAX {
                            _mm512_storeu_ps(at, v);
                        } else {
                            _mm512_mask_compressstoreu_ps(at, run.mask, v);
                        }
                    }
                }
            }
        }
    }

    /// [`Direct::weight_grad`] in bf16 on AMX tiles: `dW[o, c, t] = Σ_q bf16(dy[o, q]) ·
    /// bf16(xp[c, q + off(t)])`, accumulated in f32, over the padded offsets of every slab
    /// (zero gradient at those in the padding); per (tap, 32 channels, 32 output channels) a
    /// micro-tile sums a slab's offsets 32 at a time. The slabs in 16 fixed groups, each
    /// summed in order, then the groups in order (the same bits for any thread count).
    pub(super) fn weight_grad_amx(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let c_pad = c_n.next_multiple_of(TILE);
        let o_pad = o_n.next_multiple_of(TILE);
        let offsets = self.offsets();
        let config = TileConfig::new(MAX_PAIRS);
        let slabs = self.grad_slabs_amx();
        let group = slabs.len().div_ceil(16).max(1);
        let partials: Vec<Vec<f32>> = slabs
            .par_chunks(group)
            .map(|chunk| {
                let mut acc = vec![0f32; t_n * c_pad * o_pad];
                let mut tile = [0f32; 4 * TILE * TILE];
                GRAD_SLAB.with_borrow_mut(|(xs, dyt)| {
                    // SAFETY: AMX is available (the backend is chosen only then).
                    unsafe { config.load() };
                    for &(n, z0, planes) in chunk {
                        let (xs, channel) = self.fill_plain_slab_amx(xs, x, n, z0, planes, c_pad);
                        let (dyt, count) = self.fill_grad_tile_amx(dyt, dy, n, z0, planes, o_pad);
                        let steps = count / (2 * TILE);
                        for (t, &off) in offsets.iter().enumerate() {
                            for cb in (0..c_pad).step_by(2 * TILE) {
                                for ob in (0..o_pad).step_by(2 * TILE) {
                                    let two = [cb + 2 * TILE <= c_pad, ob + 2 * TILE <= o_pad];
                                    // SAFETY: tiles configured for 16 pairs. Input rows
                                    // up to cb + 15 (two[0]: + 31) < c_pad at offsets up to
                                    // count − 1 + off(t) ≤ end + 31 + off(t), within the
                                    // channel and the next or the slab's slack; gradient
                                    // rows count / 2 of o_pad pairs, columns up to 2·ob + 32
                                    // (two[1]: + 64) ≤ 2·o_pad.
                                    unsafe {
                                        grad_micro_tile(
                                            xs.as_ptr().add(cb * channel + off),
                                            channel,
                                            dyt.as_ptr().add(2 * ob),
                                            2 * o_pad,
                                            steps,
                                            two,
                                            &mut tile,
                                        );
                                    }
                                    let at = (t * c_pad + cb) * o_pad + ob;
                                    add_grad_tile(&tile, two, &mut acc[at..], o_pad);
                                }
                            }
                        }
                    }
                    // SAFETY: AMX is available.
                    unsafe { release() };
                });
                acc
            })
            .collect();
        let mut out = vec![0f32; o_n * c_n * t_n];
        out.par_chunks_mut(c_n * t_n)
            .enumerate()
            .for_each(|(o, row)| {
                for c in 0..c_n {
                    for t in 0..t_n {
                        let at = (t * c_pad + c) * o_pad + o;
                        row[c * t_n + t] = partials.iter().fold(0.0, |s, p| s + p[at]);
                    }
                }
            });
        out
    }

    /// The slabs of the weight gradient: as the other kernels' (2 MiB of bf16), but of at
    /// least 1024 padded offsets where the volume allows, so that a micro-tile's sum over a
    /// slab is not outweighed by adding it to the total (on 8³ maps a slab per plane took
    /// longer than the f32 kernels).
    fn grad_slabs_amx(&self) -> Vec<(usize, usize, usize)> {
        let slabs = self.slabs(4 * SLAB_VALUES);
        let [od, _, _] = self.output();
        let [_, hp, wp] = self.padded();
        let want = 1024usize.div_ceil(hp * wp).min(od);
        if slabs.iter().all(|&(_, _, planes)| planes >= want) {
            return slabs;
        }
        (0..self.samples)
            .flat_map(|n| {
                (0..od)
                    .step_by(want)
                    .map(move |z0| (n, z0, want.min(od - z0)))
            })
            .collect()
    }

    /// The padded planes of sample `n` for `planes` output planes from `z0` as bf16
    /// (`[c][z][y][x]`, `c_pad` channels, zeros past the real ones), followed by zeros for
    /// 64 offsets: the slab and its channel length.
    fn fill_plain_slab_amx<'b>(
        &self,
        buf: &'b mut Vec<u16>,
        x: &[f32],
        n: usize,
        z0: usize,
        planes: usize,
        c_pad: usize,
    ) -> (&'b [u16], usize) {
        let [c_n, d, h, w] = self.input;
        let [_, hp, wp] = self.padded();
        let [pd, ph, pw] = self.padding;
        let span = planes + self.dilation[0] * (self.kernel[0] - 1);
        let channel = span * hp * wp;
        let len = c_pad * channel + 4 * TILE;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let slab = &mut buf[..len];
        let sample = &x[n * c_n * d * h * w..][..c_n * d * h * w];
        for (c, values) in slab.chunks_mut(channel).enumerate() {
            if c >= c_n {
                values.fill(0);
                continue;
            }
            for (i, plane) in values.chunks_exact_mut(hp * wp).enumerate() {
                let Some(z) = (z0 + i).checked_sub(pd).filter(|&z| z < d) else {
                    plane.fill(0);
                    continue;
                };
                for (py, row) in plane.chunks_exact_mut(wp).enumerate() {
                    let Some(y) = py.checked_sub(ph).filter(|&y| y < h) else {
                        row.fill(0);
                        continue;
                    };
                    row[..pw].fill(0);
                    row[pw + w..].fill(0);
                    let src = &sample[((c * d + z) * h + y) * w..][..w];
                    // SAFETY: AVX-512F and AVX-512BW (the AMX backend runs only with them).
                    unsafe { pack_bf16(src, &mut row[pw..pw + w]) };
                }
            }
        }
        (slab, channel)
    }

    /// The output gradient of sample `n` at the slab's padded offsets `0 .. count` (`count`
    /// the slab's offsets rounded up to 32), as bf16 pairs of consecutive offsets per output
    /// channel: `[q / 2][o_pad][q % 2]`, zeros at offsets in the padding and past the real
    /// channels; the tile and `count`.
    fn fill_grad_tile_amx<'b>(
        &self,
        buf: &'b mut Vec<u16>,
        dy: &[f32],
        n: usize,
        z0: usize,
        planes: usize,
        o_pad: usize,
    ) -> (&'b [u16], usize) {
        let o_n = self.out_channels;
        let [_, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let volume = self.output().iter().product::<usize>();
        let end = (planes - 1) * hp * wp + (oh - 1) * wp + ow;
        let count = end.next_multiple_of(2 * TILE);
        let len = count * o_pad;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let tile = &mut buf[..len];
        tile.fill(0);
        let sample = &dy[n * o_n * volume..][..o_n * volume];
        for z in 0..planes {
            for y in 0..oh {
                let q0 = z * hp * wp + y * wp;
                let first = ((z0 + z) * oh + y) * ow;
                // offset by offset, the channels in turn: the writes are consecutive
                for x in 0..ow {
                    let q = q0 + x;
                    let at = (q / 2) * o_pad * 2 + q % 2;
                    for (o, v) in tile[at..].iter_mut().step_by(2).take(o_n).enumerate() {
                        *v = bf16_bits(sample[o * volume + first + x]);
                    }
                }
            }
        }
        (tile, count)
    }

    /// The weights as bf16 weight tiles, `[block][t][g][o % 16][pair][2]`: pair `k` of group
    /// `g` holds channels `2·pairs·g + 2k` and `+ 1` of output channel `16·block + o % 16`;
    /// zeros past the real channels.
    fn pack_weights_amx(&self, w: &[f32], ch: Channels, blocks: usize) -> Vec<u16> {
        let (o_n, c_n, t_n) = (self.out_channels, self.input[0], self.taps());
        let tile = TILE * ch.pairs * 2;
        let mut out = vec![0u16; blocks * t_n * ch.groups * tile];
        for o in 0..o_n {
            for c in 0..c_n {
                let (g, k) = (c / (2 * ch.pairs), c % (2 * ch.pairs));
                for t in 0..t_n {
                    let at = ((o / TILE * t_n + t) * ch.groups + g) * tile
                        + (o % TILE) * ch.pairs * 2
                        + k;
                    out[at] = bf16_bits(w[(o * c_n + c) * t_n + t]);
                }
            }
        }
        out
    }

    /// The padded planes `z0 .. z0 + planes + halo` of sample `n` as bf16 channel pairs
    /// (`[c / 2][z][y][x]`, each value the two channels' bf16 bits, even channel low), in
    /// `buf` (grown if needed), followed by [`SLACK_VOXELS`] zeros: the slab and its channel
    /// (pair) length.
    fn fill_slab_amx<'b>(
        &self,
        buf: &'b mut Vec<u32>,
        x: &[f32],
        n: usize,
        z0: usize,
        planes: usize,
        cp: usize,
    ) -> (&'b [u32], usize) {
        let [c_n, d, h, w] = self.input;
        let [_, hp, wp] = self.padded();
        let [pd, ph, pw] = self.padding;
        let span = planes + self.dilation[0] * (self.kernel[0] - 1);
        let channel = span * hp * wp;
        let len = cp / 2 * channel + SLACK_VOXELS;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let slab = &mut buf[..len];
        let sample = &x[n * c_n * d * h * w..][..c_n * d * h * w];
        let row_of = |c: usize, z: usize, y: usize| &sample[((c * d + z) * h + y) * w..][..w];
        for (p, pair) in slab.chunks_mut(channel).enumerate() {
            if p * 2 >= c_n {
                pair.fill(0);
                continue;
            }
            for (i, plane) in pair.chunks_exact_mut(hp * wp).enumerate() {
                let Some(z) = (z0 + i).checked_sub(pd).filter(|&z| z < d) else {
                    plane.fill(0);
                    continue;
                };
                for (py, row) in plane.chunks_exact_mut(wp).enumerate() {
                    let Some(y) = py.checked_sub(ph).filter(|&y| y < h) else {
                        row.fill(0);
                        continue;
                    };
                    row[..pw].fill(0);
                    row[pw + w..].fill(0);
                    let odd = (2 * p + 1 < c_n).then(|| row_of(2 * p + 1, z, y));
                    // SAFETY: AVX-512F (the AMX backend runs only with it).
                    unsafe { pack_pairs(row_of(2 * p, z, y), odd, &mut row[pw..pw + w]) };
                }
            }
        }
        (slab, channel)
    }
}

/// `acc[c·o_pad + o] += tile` for the micro-tile's 16 or 32 (`two[0]`) input × 16 or 32
/// (`two[1]`) output channels (accumulator `2·(c / 16) + o / 16`, row c % 16, column o % 16).
fn add_grad_tile(tile: &[f32; 4 * TILE * TILE], two: [bool; 2], acc: &mut [f32], o_pad: usize) {
    for (i, block) in tile.chunks_exact(TILE * TILE).enumerate() {
        if (i / 2 == 1 && !two[0]) || (i % 2 == 1 && !two[1]) {
            continue;
        }
        let (cb, ob) = (i / 2 * TILE, i % 2 * TILE);
        for (r, row) in block.chunks_exact(TILE).enumerate() {
            for (a, v) in acc[(cb + r) * o_pad + ob..][..TILE].iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

/// `out[i]` = the bf16 bits of `src[i]` (rounded to nearest even; NaN stays NaN): scalar
/// code that the compiler vectorises with AVX-512.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_bf16(src: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(src) {
        *o = bf16_round(v) as u16;
    }
}

/// The bf16 bits of `v` in the low half: rounded to nearest even, NaN a quiet NaN.
#[inline(always)]
fn bf16_round(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16;
    if v.is_nan() { 0x7fc0 } else { rounded }
}

/// `out[i]` = the bf16 bits of `even[i]` (low half) and `odd[i]` (high half, 0 without odd):
/// scalar code that the compiler vectorises with AVX-512.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_pairs(even: &[f32], odd: Option<&[f32]>, out: &mut [u32]) {
    let bits = bf16_round;
    match odd {
        Some(odd) => {
            for ((o, &a), &b) in out.iter_mut().zip(even).zip(odd) {
                *o = bits(a) | (bits(b) << 16);
            }
        }
        None => {
            for (o, &a) in out.iter_mut().zip(even) {
                *o = bits(a);
            }
        }
    }
}
