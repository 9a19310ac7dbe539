//! Slabs of padded input for the direct micro-kernels (`avx512.rs`, `avx2.rs`), and the
//! drivers that run a backend's micro-kernels over them: a slab holds a few output planes'
//! padded input planes (with the kernel's halo), about half the L2 and at least one output
//! plane's worth (C × (1 + halo) × Hp × Wp), in a buffer each worker thread keeps across calls
//! (it grows to the largest slab seen), so the padded volume is never allocated (no page
//! faults) and the slab is in L2 while the micro-kernels read it.

use std::cell::RefCell;

use rayon::prelude::*;

use super::live::{Step, StepLists};
use super::{Direct, Shared};
use crate::fused::zeros;

/// Zeros after a slab: a full vector (16 lanes) read from any voxel of the slab stays inside.
pub(super) const SLACK: usize = 16;

/// Up to 16 consecutive voxels of one output row (or, packed, of consecutive rows): padded
/// input offset of the first lane (within a channel of the sample's slab), output offset of
/// the first voxel (within a channel of the sample's output) and which lanes are voxels. A
/// mask of 0 makes a chunk a no-op (stores nothing).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Chunk {
    pub input: usize,
    pub output: usize,
    pub mask: u16,
}

impl Chunk {
    /// The chunk moved by `input` padded offsets and `output` output voxels (to its plane).
    fn shifted(&self, input: usize, output: usize) -> Chunk {
        Chunk {
            input: self.input + input,
            output: self.output + output,
            mask: self.mask,
        }
    }
}

/// Chunks per forward micro-tile, at most (a backend's kernel may take fewer).
pub(super) const TILE_CHUNKS: usize = 3;

/// What every forward micro-tile of one convolution shares.
///
/// `xp`: the padded input slab; `steps`: the tile's live (c, t) steps, each the offset of its
/// input from a voxel's own padded offset and the row of its weights; `w`: weights packed as
/// `[o / R][k][o % R]` (`weight_rows` rows `k` per block, zeros past the last channel); `y`:
/// the sample's output, `o_n` channels of `volume` values. The steps are summed in blocks of
/// `k_block`; the output is initialised by the first block and read back by the next ones (it
/// stays zero where no step is live). `packed`: a chunk's set lanes are consecutive
/// output voxels from its `output` (`avx512::forward_tile` states the contract).
#[derive(Clone, Copy)]
pub(super) struct ForwardArgs<'a> {
    pub xp: *const f32,
    pub steps: &'a [Step],
    pub w: *const f32,
    pub weight_rows: usize,
    pub o_n: usize,
    pub y: *mut f32,
    pub volume: usize,
    pub k_block: usize,
    pub packed: bool,
}

/// A forward micro-kernel: writes the outputs of 1 to [`TILE_CHUNKS`] chunks for every output
/// channel.
pub(super) type ForwardTile = unsafe fn(&ForwardArgs<'_>, &[Chunk]);

/// A weight-gradient micro-kernel: `(rows, ks, len, dyt, o_pad, acc)` adds one tile's weight
/// gradient to the rows `ks` of `acc` (`avx512::weight_grad_tile` states the contract).
pub(super) type GradTile = unsafe fn(&[*const f32], &[usize], usize, *const f32, usize, *mut f32);

/// A backend's micro-kernels and their shapes.
pub(super) struct Kernels {
    /// Voxels per chunk (lanes of a vector); `o_pad` of the weight gradient is a multiple.
    pub lanes: usize,
    /// Whether the forward kernel stores packed chunks (expand / compress).
    pub packed: bool,
    /// Output channels per forward block (the weights are packed `[o / R][c][t][o % R]`).
    pub channels: usize,
    /// Chunks per forward micro-tile, at most [`TILE_CHUNKS`] (`Direct::plane_tiles` cuts
    /// tiles of 1 to this many).
    pub chunks: usize,
    /// Values of a slab, about: half the L2 of the CPUs the backend was tuned on.
    pub slab_values: usize,
    pub forward: ForwardTile,
    pub weight_grad: GradTile,
}

thread_local! {
    /// This worker thread's slab of padded input planes, reused across calls.
    pub(super) static SLAB: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Direct {
    /// Slabs `(sample, z0, planes)`: groups of consecutive output planes whose padded input
    /// (`planes + dil·(kd − 1)` planes of every channel) fits `values`, at least 16 in all
    /// when the volume allows (both threads busy to the end).
    pub(super) fn slabs(&self, values: usize) -> Vec<(usize, usize, usize)> {
        let [od, _, _] = self.output();
        let [_, hp, wp] = self.padded();
        let halo = self.dilation[0] * (self.kernel[0] - 1);
        let plane = self.input[0] * hp * wp;
        let fit = (values / plane.max(1)).saturating_sub(halo);
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
    /// z0 + planes`, padded into `buf` (grown if needed): the slab and its channel length. The
    /// slab is followed by [`SLACK`] zeros, so that a vector load starting at a voxel of the
    /// slab's last row stays in the returned slice.
    pub(super) fn fill_slab<'b>(
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
        if buf.len() < len + SLACK {
            buf.resize(len + SLACK, 0.0);
        }
        self.pad_slab(&x[n * sample..][..sample], z0, &mut buf[..len]);
        buf[len..len + SLACK].fill(0.0);
        (&buf[..len + SLACK], sv)
    }

    /// One output plane in chunks of `lanes` lanes, input offsets within a slab whose first
    /// plane is the output plane's, and whether they are packed. Rows of at least `lanes`
    /// voxels (or whose padding is wider than the row, or when `may_pack` is false): chunks of
    /// up to `lanes` voxels of a row, lane `l` at `output + l`. Narrower rows: `lanes`
    /// consecutive padded offsets spanning rows, the lanes in the padding masked off and the
    /// others packed (consecutive in the output); e.g. 8³ with padding 1 in 16 lanes uses 80%
    /// of the lanes instead of 50%.
    pub(super) fn plane_chunks(&self, lanes: usize, may_pack: bool) -> (Vec<Chunk>, bool) {
        let [_, oh, ow] = self.output();
        let [_, _, wp] = self.padded();
        let rows = ow as f64 / (lanes * ow.div_ceil(lanes)) as f64;
        let packed = may_pack && (ow as f64 / wp as f64) > rows;
        let mut v = Vec::new();
        if packed {
            let end = (oh - 1) * wp + ow;
            for q0 in (0..end).step_by(lanes) {
                let mut mask = 0u16;
                let mut first = None;
                for l in 0..lanes {
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
                for x0 in (0..ow).step_by(lanes) {
                    let n = (ow - x0).min(lanes);
                    v.push(Chunk {
                        input: y * wp + x0,
                        output: y * ow + x0,
                        mask: ((1u32 << n) - 1) as u16,
                    });
                }
            }
        }
        (v, packed)
    }

    /// [`Direct::forward`] by a backend's forward micro-kernel: slabs in parallel; within a
    /// slab's planes, the tiles of [`Direct::plane_tiles`] × every output channel, each over
    /// its live (c, t) steps.
    pub(super) fn forward_slabs(&self, x: &[f32], w: &[f32], kernels: &Kernels) -> Vec<f32> {
        let r_n = kernels.channels;
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let [_, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let volume: usize = self.output().iter().product();
        let offsets = self.offsets();
        let weights = self.pack_weights(w, r_n);
        let (row_chunks, packed) = self.plane_chunks(kernels.lanes, kernels.packed);
        let tiles = self.plane_tiles(&row_chunks, kernels.lanes, kernels.chunks);
        let mut out = zeros(self.samples * o_n * volume);
        let dst = Shared(out.as_mut_ptr());
        self.slabs(kernels.slab_values)
            .par_iter()
            .for_each(|&(n, z0, planes)| {
                SLAB.with_borrow_mut(|buf| {
                    let (slab, sv) = self.fill_slab(buf, x, n, z0, planes);
                    let mut lists = StepLists::default();
                    for z in 0..planes {
                        let live = self.live_planes(z0 + z);
                        for tile in &tiles {
                            let steps = lists.get(self, &offsets, sv, (live, tile.rows));
                            let per_channel = steps.len() / c_n.max(1);
                            let chunks: Vec<Chunk> = row_chunks[tile.start..][..tile.len]
                                .iter()
                                .map(|ch| ch.shifted(z * hp * wp, (z0 + z) * oh * ow))
                                .collect();
                            let args = ForwardArgs {
                                xp: slab.as_ptr(),
                                steps,
                                w: weights.as_ptr(),
                                weight_rows: c_n * t_n,
                                o_n,
                                // SAFETY: sample n's output is O·volume values of `out`.
                                y: unsafe { dst.get().add(n * o_n * volume) },
                                volume,
                                // whole channels, about 128 steps, whose input rows stay in L1
                                k_block: (128 / per_channel.max(1)).clamp(1, c_n.max(1))
                                    * per_channel.max(1),
                                packed,
                            };
                            // SAFETY: the backend's CPU features were checked by
                            // `Backend::best`. A chunk's set lanes are output voxels of the
                            // slab's planes (x < Wo, y < Ho), so every step reads padded x +
                            // dil·e < Wp in its row, rows < Hp and planes < span of the slab
                            // (C·sv values), and a full vector from any of them stays within
                            // the slab and its SLACK; the weights hold blocks·C·T·R values and
                            // every step's k < C·T; a chunk's voxels (packed: consecutive from
                            // `output`) lie in its plane, and each chunk belongs to one tile of
                            // one slab.
                            unsafe { (kernels.forward)(&args, &chunks) };
                        }
                    }
                });
            });
        out
    }

    /// The weights `(O, C, kd, kh, kw)` packed as `[o / R][c][t][o % R]`, zero past the last
    /// channel.
    fn pack_weights(&self, w: &[f32], r_n: usize) -> Vec<f32> {
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let mut weights = vec![0f32; o_n.div_ceil(r_n) * c_n * t_n * r_n];
        for o in 0..o_n {
            for c in 0..c_n {
                for t in 0..t_n {
                    weights[(((o / r_n) * c_n + c) * t_n + t) * r_n + o % r_n] =
                        w[(o * c_n + c) * t_n + t];
                }
            }
        }
        weights
    }

    /// [`Direct::weight_grad`] by a backend's weight-gradient micro-kernel over tiles of padded
    /// offsets within slabs; the slabs in 16 fixed groups, each summed in order, then the
    /// groups in order.
    pub(super) fn weight_grad_slabs(&self, x: &[f32], dy: &[f32], kernels: &Kernels) -> Vec<f32> {
        let c_n = self.input[0];
        let (o_n, t_n) = (self.out_channels, self.taps());
        let k_n = c_n * t_n;
        let o_pad = o_n.next_multiple_of(kernels.lanes);
        let [_, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let volume: usize = self.output().iter().product();
        let offsets = self.offsets();
        // the transposed gradient tile (len × o_pad) within 32 KiB (L1)
        let len_max = (8192 / o_pad).clamp(16, 1024);
        let slabs = self.slabs(kernels.slab_values);
        let group = slabs.len().div_ceil(16).max(1);
        let partials: Vec<Vec<f32>> = slabs
            .par_chunks(group)
            .map(|chunk| {
                let mut acc = vec![0f32; k_n * o_pad];
                let mut dyt = vec![0f32; len_max * o_pad];
                let mut rows: Vec<*const f32> = Vec::with_capacity(k_n);
                let mut ks: Vec<usize> = Vec::with_capacity(k_n);
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
                            // the (c, t) rows reading inside the input somewhere in the tile
                            let (live_planes, live_rows) = self.live_in_range(q0, q1);
                            let live = self.live_taps(live_planes, live_rows);
                            rows.clear();
                            ks.clear();
                            for c in 0..c_n {
                                for &t in &live {
                                    // in bounds: the last offset q1 − 1 − base + off(t) is
                                    // within the slab's channel
                                    rows.push(
                                        slab[c * sv + q0 - base + offsets[t]..][..len].as_ptr(),
                                    );
                                    ks.push(c * t_n + t);
                                }
                            }
                            if rows.is_empty() {
                                continue;
                            }
                            // SAFETY: the backend's CPU features were checked by
                            // `Backend::best`; each row was sliced to `len` values above and
                            // every k < C·T; dyt holds len_max·o_pad ≥ len·o_pad values, acc
                            // k_n·o_pad; o_pad is a multiple of the kernel's lanes.
                            unsafe {
                                (kernels.weight_grad)(
                                    &rows,
                                    &ks,
                                    len,
                                    dyt.as_ptr(),
                                    o_pad,
                                    acc.as_mut_ptr(),
                                );
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
