//! The direct convolution in bf16 on AMX tiles (`Precision::Bf16`, CPUs with AMX-BF16): the
//! input is padded into slabs with the channels last and rounded to bf16, so that 16
//! consecutive padded offsets × 16 channel pairs at one tap are one tile of 16 rows
//! (`tileloadd` with a row stride of `Cp` values); the weights are packed per (16 output
//! channels, tap, 32 input channels) as the pair-interleaved tile `tdpbf16ps` multiplies by.
//! One micro-tile is 32 voxels × 32 output channels in the four accumulator tiles:
//!
//! `C[v, o] += Σ_t Σ_c bf16(xp[q(v) + off(t), c]) · bf16(w[o, c, t])`, accumulated in f32,
//!
//! with two input tiles (voxels 0–15, 16–31) and two weight tiles (output channels 0–15,
//! 16–31) per (tap, 32 channels): 4 tile loads for 4 tile products of 16 × 16 × 32. Offsets
//! in the padding between rows are computed and dropped, as in the other kernels.
//!
//! Measured on one core of the Xeon it was written on: 3.06 TFLOP/s from registers against
//! 0.10 for `vdpbf16ps` (AVX512_BF16) and about 0.2 for f32 FMA (`examples/fma_peak.rs`):
//! AMX, not AVX512_BF16, is this CPU's bf16 path.

use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{Direct, Shared};
use crate::precision::bf16_bits;

/// Voxels (rows) and output channels (f32 columns) of an accumulator tile.
const TILE: usize = 16;
/// Channel pairs per input tile row, at most (64 bytes).
const MAX_PAIRS: usize = 16;
/// Voxels after a slab (zeros): the last micro-tile reads up to 31 voxels past the last
/// output voxel's taps.
const SLACK_VOXELS: usize = 2 * TILE;
/// bf16 values of a slab, about (1 MiB: half the L2 of the Xeon it was written on).
const SLAB_VALUES: usize = 1 << 19;

thread_local! {
    /// This worker thread's channels-last bf16 slab, reused across calls.
    static SLAB: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Whether the CPU has AMX-BF16 and AMX-TILE (CPUID leaf 7, EDX bits 22 and 24) and the
/// operating system grants this process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`, asked once).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && os_grants_tiles())
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
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
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

/// The tile configuration (palette 1): tiles 0–3 accumulators (16 rows × 16 f32), 4–5 input
/// (16 voxels × `pairs` pairs), 6–7 weights (`pairs` rows × 16 output channel pairs).
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

/// One micro-tile: `out[i]` (16 × 16 f32, row = voxel) for accumulator `i` = (voxel half
/// `i / 2`, output block `i % 2`), summed over the (tap, channel group) steps:
/// input tiles at `a + a_steps[s]` and `a + a_steps[s] + 16·cp` (row stride `2·cp` bytes),
/// weight tiles at `b0 + s·b_step` and `b1 + s·b_step` (row stride 64 bytes).
///
/// # Safety
/// The thread's tiles are configured for `pairs` (`TileConfig::new`); for every step the 32
/// rows of `4·pairs` bytes from `a + a_steps[s]` (stride `2·cp` bytes) and the `pairs` rows of
/// 64 bytes from `b0`/`b1 + s·b_step` are readable.
unsafe fn micro_tile(
    a: *const u16,
    a_steps: &[usize],
    cp: usize,
    b0: *const u16,
    b1: *const u16,
    b_step: usize,
    out: &mut [f32; 4 * TILE * TILE],
) {
    let a_stride = 2 * cp;
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
        for (s, &off) in a_steps.iter().enumerate() {
            let a0 = a.add(off);
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a0.add(TILE * cp),
                b0 = in(reg) b0.add(s * b_step),
                b1 = in(reg) b1.add(s * b_step),
                sa = in(reg) a_stride,
                sb = in(reg) 4 * TILE,
                options(nostack, readonly)
            );
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

impl Direct {
    /// [`Direct::forward`] in bf16 on AMX tiles (module doc): slabs in parallel, micro-tiles of
    /// 32 padded offsets × 32 output channels within a slab.
    pub(super) fn forward_amx(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let ch = Channels::new(self.input[0]);
        let o_n = self.out_channels;
        let t_n = self.taps();
        let [_, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let volume: usize = self.output().iter().product();
        let blocks = o_n.div_ceil(TILE).next_multiple_of(2);
        let weights = self.pack_weights_amx(w, ch, blocks);
        let b_step = ch.pairs * 2 * TILE;
        let steps = t_n * ch.groups;
        // input tile of step (t, g): voxel offset off(t), channels from 2·pairs·g
        let a_steps: Vec<usize> = self
            .offsets()
            .iter()
            .flat_map(|&off| (0..ch.groups).map(move |g| off * ch.cp + g * 2 * ch.pairs))
            .collect();
        let config = TileConfig::new(ch.pairs);
        let mut out = vec![0f32; self.samples * o_n * volume];
        let dst = Shared(out.as_mut_ptr());
        let plane = hp * wp;
        // slabs sized as the f32 kernels' for `cp / 2` channels of f32
        let slab_values = SLAB_VALUES * self.input[0].max(1) / ch.cp.max(1);
        self.slabs(slab_values).par_iter().for_each(|&(n, z0, planes)| {
            SLAB.with_borrow_mut(|buf| {
                let slab = self.fill_slab_amx(buf, x, n, z0, planes, ch.cp);
                let end = (planes - 1) * plane + (oh - 1) * wp + ow;
                let mut acc = [0f32; 4 * TILE * TILE];
                // SAFETY: AMX is available (the backend is chosen only then).
                unsafe { config.load() };
                for q in (0..end).step_by(2 * TILE) {
                    // output offset (within a channel of sample n) of voxel q + m, if any
                    let voxel: [Option<usize>; 2 * TILE] = std::array::from_fn(|m| {
                        let v = q + m;
                        let (z, y, xx) = (v / plane, v % plane / wp, v % wp);
                        (v < end && y < oh && xx < ow).then(|| ((z0 + z) * oh + y) * ow + xx)
                    });
                    for ob in (0..blocks).step_by(2) {
                        // SAFETY: tiles configured for `pairs` above. Input tiles: rows
                        // q + m + off(t) for m < 32, at most end − 1 + 31 + off(t) voxels, the
                        // last output voxel's last tap plus 31 (< slab + SLACK_VOXELS voxels of
                        // cp values), columns within cp; weight tiles: blocks ob, ob + 1 < blocks
                        // of `steps` steps of b_step values each.
                        unsafe {
                            micro_tile(
                                slab.as_ptr().add(q * ch.cp),
                                &a_steps,
                                ch.cp,
                                weights.as_ptr().add(ob * steps * b_step),
                                weights.as_ptr().add((ob + 1) * steps * b_step),
                                b_step,
                                &mut acc,
                            );
                        }
                        self.scatter_amx(&acc, &voxel, ob, dst, n);
                    }
                }
                // SAFETY: AMX is available.
                unsafe { release() };
            });
        });
        out
    }

    /// Writes the micro-tile `acc` (voxel half h, output block ob + k at `acc[(2h + k)·256]`,
    /// row = voxel) to sample `n`'s output voxels `voxel` of the real output channels.
    fn scatter_amx(
        &self,
        acc: &[f32; 4 * TILE * TILE],
        voxel: &[Option<usize>; 2 * TILE],
        ob: usize,
        dst: Shared,
        n: usize,
    ) {
        let o_n = self.out_channels;
        let volume: usize = self.output().iter().product();
        for (m, at) in voxel.iter().enumerate() {
            let Some(at) = *at else { continue };
            for k in 0..2 {
                let row = &acc[((2 * (m / TILE) + k) * TILE + m % TILE) * TILE..][..TILE];
                for (j, &v) in row.iter().enumerate() {
                    let o = (ob + k) * TILE + j;
                    if o < o_n {
                        // SAFETY: voxel `at` of channel o < O of sample n lies in the output;
                        // the slab of this micro-tile alone writes it.
                        unsafe { *dst.get().add((n * o_n + o) * volume + at) = v };
                    }
                }
            }
        }
    }

    /// The weights as bf16 weight tiles, `[block][t][g][pair][o % 16][2]`: pair `k` of group
    /// `g` holds channels `2·pairs·g + 2k` and `+ 1` of output channel `16·block + o % 16`;
    /// zeros past the real channels.
    fn pack_weights_amx(&self, w: &[f32], ch: Channels, blocks: usize) -> Vec<u16> {
        let (o_n, c_n, t_n) = (self.out_channels, self.input[0], self.taps());
        let tile = ch.pairs * 2 * TILE;
        let mut out = vec![0u16; blocks * t_n * ch.groups * tile];
        for o in 0..o_n {
            for c in 0..c_n {
                let (g, k, e) = (c / (2 * ch.pairs), c % (2 * ch.pairs) / 2, c % 2);
                for t in 0..t_n {
                    let at = ((o / TILE * t_n + t) * ch.groups + g) * tile
                        + (k * TILE + o % TILE) * 2
                        + e;
                    out[at] = bf16_bits(w[(o * c_n + c) * t_n + t]);
                }
            }
        }
        out
    }

    /// The padded planes `z0 .. z0 + planes + halo` of sample `n`, channels last
    /// (`[z][y][x][cp]`), rounded to bf16, in `buf` (grown if needed), followed by
    /// [`SLACK_VOXELS`] voxels of zeros.
    fn fill_slab_amx<'b>(
        &self,
        buf: &'b mut Vec<u16>,
        x: &[f32],
        n: usize,
        z0: usize,
        planes: usize,
        cp: usize,
    ) -> &'b [u16] {
        let [c_n, d, h, w] = self.input;
        let [_, hp, wp] = self.padded();
        let [pd, ph, pw] = self.padding;
        let span = planes + self.dilation[0] * (self.kernel[0] - 1);
        let len = (span * hp * wp + SLACK_VOXELS) * cp;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let slab = &mut buf[..len];
        slab.fill(0);
        let sample = &x[n * c_n * d * h * w..][..c_n * d * h * w];
        for i in 0..span {
            let Some(z) = (z0 + i).checked_sub(pd).filter(|&z| z < d) else {
                continue;
            };
            for y in 0..h {
                let row = &mut slab[((i * hp + y + ph) * wp + pw) * cp..][..w * cp];
                for c in 0..c_n {
                    let src = &sample[((c * d + z) * h + y) * w..][..w];
                    for (v, &s) in row[c..].iter_mut().step_by(cp).zip(src) {
                        *v = bf16_bits(s);
                    }
                }
            }
        }
        slab
    }
}
