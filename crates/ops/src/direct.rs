//! The CPU fast path of unit-stride `conv3d` in f32 (every convolution of the U-Net, V-Net's
//! 5³ ones, DeepLabV3's dilated ones). The input is padded once; the output voxel at padded
//! offset `q = z·Hp·Wp + y·Wp + x` reads tap `t` at `q + off(t)`, so for a run of `L`
//! consecutive offsets the column block (C·T × L) is C·T contiguous copies from the padded input —
//! small enough to stay in L2 — and one `gemm` `(O × C·T) · (C·T × L)` gives the tile's outputs
//! (offsets falling in the padding are computed and dropped, a few per cent). The weight gradient
//! is `Σ tile(dy) · columnsᵀ` over the same tiles, summed in a fixed order; the input gradient is
//! this convolution of the output gradient with the flipped, transposed kernel.
//!
//! `unsafe` is allowed here (the workspace denies it elsewhere) for the `gemm` crate's raw
//! pointer interface and for writing the disjoint output voxels of parallel tiles. It pays: on
//! 2×32×64³ (32→32, k 3) forward + backward is 3.5× faster than vol2col + matmul
//! (BENCHMARKS.md, "conv3d"). Every pointer is derived from a buffer sized from the geometry,
//! checked by `Direct::check` before the first product.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fused::{channel_sums, f32_slice, shift_channels, zeros};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod channels_last;
#[cfg(target_arch = "x86_64")]
mod live;
#[cfg(target_arch = "x86_64")]
mod slab;

/// Geometry of a unit-stride convolution of one sample: input `(C, D, H, W)`, kernel
/// `(kd, kh, kw)`, padding and dilation per axis, `O` output channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct {
    pub input: [usize; 4],
    pub kernel: [usize; 3],
    pub padding: [usize; 3],
    pub dilation: [usize; 3],
    pub out_channels: usize,
    pub samples: usize,
    /// Which products compute it.
    pub backend: Backend,
}

/// The products behind [`Direct`]: the micro-kernels of `avx512.rs` where the CPU has
/// AVX-512F, else those of `avx2.rs` where it has AVX2 and FMA, else column blocks and `gemm`
/// (SSE or NEON, as the `gemm` crate picks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Backend {
    Gemm,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
    /// bf16 on AMX tiles (`amx.rs`), chosen by `conv3d` only in bf16 precision.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Amx,
}

/// Whether this machine runs the AMX-BF16 kernels (CPU and operating system).
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx_available() -> bool {
    amx::available()
}

impl Backend {
    /// The fastest backend this CPU runs, capped by the environment variable
    /// `CWSEG_CPU_CAPABILITY` (`avx512`, `avx2` or `default`: the `gemm` path), as PyTorch's
    /// `ATEN_CPU_CAPABILITY` caps its kernels: to compare the paths on one machine, or to run
    /// the AVX2 kernels on an AVX-512 CPU. Read once per process.
    pub fn best() -> Backend {
        static BEST: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = match std::env::var("CWSEG_CPU_CAPABILITY") {
                Err(_) => Backend::Avx512,
                Ok(v) => Backend::parse_cap(&v).unwrap_or_else(|| {
                    tracing::warn!(
                        "CWSEG_CPU_CAPABILITY={v:?} is not avx512, avx2 or default; ignored"
                    );
                    Backend::Avx512
                }),
            };
            Backend::detected().min(cap)
        })
    }

    /// The backend a `CWSEG_CPU_CAPABILITY` value allows at most.
    fn parse_cap(value: &str) -> Option<Backend> {
        match value.trim().to_ascii_lowercase().as_str() {
            "avx512" => Some(Backend::Avx512),
            "avx2" => Some(Backend::Avx2),
            "default" | "gemm" => Some(Backend::Gemm),
            _ => None,
        }
    }

    /// The fastest backend this CPU runs.
    fn detected() -> Backend {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            return Backend::Avx512;
        } else if avx2::available() {
            return Backend::Avx2;
        }
        Backend::Gemm
    }
}

/// Values of a forward tile's column block (by benchmark on 2×32×64³: 2^16 to 2^20 measured,
/// 2^17 and 2^18 best).
const FORWARD_TILE: usize = 1 << 17;
/// Values of a weight-gradient tile's column block (2^17 to 2^21 measured; 2^19 best on the
/// deep U-Net levels, equal elsewhere).
const WEIGHT_GRAD_TILE: usize = 1 << 19;

/// A pointer that may cross threads: each tile writes voxels no other tile writes.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
// SAFETY: used only to write disjoint output voxels from parallel tiles (see `forward`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the whole `Shared`).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

impl Direct {
    /// Padded input sizes `(Dp, Hp, Wp)`.
    fn padded(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.input[a + 1] + 2 * self.padding[a])
    }

    /// Output sizes `(Do, Ho, Wo)`.
    pub fn output(&self) -> [usize; 3] {
        let p = self.padded();
        std::array::from_fn(|a| p[a].saturating_sub(self.dilation[a] * (self.kernel[a] - 1)))
    }

    fn taps(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Offset of every tap in the flattened padded input.
    fn offsets(&self) -> Vec<usize> {
        let [_, hp, wp] = self.padded();
        let [kd, kh, kw] = self.kernel;
        let mut v = Vec::with_capacity(self.taps());
        for a in 0..kd {
            for b in 0..kh {
                for e in 0..kw {
                    v.push(
                        a * self.dilation[0] * hp * wp
                            + b * self.dilation[1] * wp
                            + e * self.dilation[2],
                    );
                }
            }
        }
        v
    }

    /// Values of all samples' input, of the weights and of all samples' output.
    fn lengths(&self) -> (usize, usize, usize) {
        let input = self.samples * self.input.iter().product::<usize>();
        let weights = self.out_channels * self.input[0] * self.taps();
        let output = self.samples * self.out_channels * self.output().iter().product::<usize>();
        (input, weights, output)
    }

    /// Whether this path beats vol2col for this geometry (by benchmark, BENCHMARKS.md).
    /// Both compute some lanes or offsets in the padding and drop them, and the dilated
    /// convolutions on small maps are mostly padding. AVX-512: the padded volume within twice
    /// the output and planes of more than 64 voxels for the row kernels (on 8³ maps they lose
    /// to vol2col: the U-Net's 128-channel 8³ level, forward + backward, 21.1–22.7 ms against
    /// 17.7–18.7), or the channels-last kernels' maps ([`Direct::channels_last_pays`]: that
    /// level 14.9–16.5 ms against vol2col's 25.6–30.8 on the AMD EPYC of 2026-12-07; 4³ maps
    /// stay on vol2col, 4.3–5.3 ms forward against 3.1); AMX (bf16): 64
    /// voxels and more. `gemm`: within 1.5 times (64³ and 16³ with padding 1 win, 8³ and 4³
    /// lose, as do DeepLabV3's 8³ maps with dilations up to 18).
    pub fn pays(&self) -> bool {
        let padded: usize = self.padded().iter().product();
        let [od, oh, ow] = self.output();
        match self.backend {
            Backend::Avx512 => {
                (padded <= 2 * od * oh * ow && oh * ow > 64) || self.channels_last_pays()
            }
            Backend::Amx => padded <= 2 * od * oh * ow && oh * ow >= 64,
            Backend::Avx2 => padded <= 2 * od * oh * ow && ow >= 8,
            Backend::Gemm => 2 * padded <= 3 * od * oh * ow,
        }
    }

    /// Whether the channels-last kernels (`direct/channels_last.rs`) take this convolution on
    /// AVX-512: planes of 33 to 64 output voxels (8³; on 4³ the voxel blocks span rows and
    /// vol2col stays faster), or up to 256 (16³) where `C·T ≥ 16 000`, at least 16 channels in
    /// and out, and a kernel whose reach along each axis, `dil·(k − 1)`, is within the map
    /// (beyond it most taps read padding, and the tiles of live taps do better).
    fn channels_last_pays(&self) -> bool {
        let [_, oh, ow] = self.output();
        // 16³ maps with long reductions too: V-Net's 128-channel 5³ layer, forward + backward,
        // 499–501 ms against the row kernels' 554–567; its 64-channel one even (127–129
        // against 131–133), the U-Net's 64-channel 3³ level slower (33–38 against 31–32)
        let long = self.input[0] * self.taps() >= 16_000;
        let plane = oh * ow;
        (plane > 32 && (plane <= 64 || (long && plane <= 256))) && self.channels_last_fits()
    }

    /// Whether the channels-last weight gradient takes this convolution (whichever kernel its
    /// forward pass runs on): where [`Direct::channels_last_pays`], and on every 16³ map with
    /// at least 16 channels in and out (V-Net's 64-channel 5³ layer, forward + backward,
    /// 118–123 ms against the row kernels' 133–140; the U-Net's 64-channel level 2 29.6
    /// against 30.1–32.5; on 32³ maps it loses, 298–300 against 252–254).
    fn channels_last_grad_pays(&self) -> bool {
        let [_, oh, ow] = self.output();
        self.channels_last_pays() || ((33..=256).contains(&(oh * ow)) && self.channels_last_fits())
    }

    /// What both channels-last paths ask of every geometry: at least 16 channels in and out,
    /// and a kernel whose reach along each axis, `dil·(k − 1)`, is within the map (input and
    /// output): beyond it most taps read padding.
    fn channels_last_fits(&self) -> bool {
        let out = self.output();
        let reach = (0..3)
            .all(|a| self.dilation[a] * (self.kernel[a] - 1) <= out[a].min(self.input[a + 1]));
        self.input[0] >= 16 && self.out_channels >= 16 && reach
    }

    /// Whether the unit-stride geometry is valid (output not empty).
    pub fn check(&self) -> Result<()> {
        let fits = self
            .padded()
            .iter()
            .zip(self.kernel.iter().zip(&self.dilation))
            .all(|(&p, (&k, &d))| k > 0 && p > d * (k - 1));
        if !fits {
            bail!("conv3d: kernel larger than the padded input");
        }
        Ok(())
    }

    /// All samples, padded: `(N, C, Dp, Hp, Wp)`.
    fn pad(&self, x: &[f32]) -> Vec<f32> {
        let [_, d, h, w] = self.input;
        let [dp, hp, wp] = self.padded();
        let [pd, ph, pw] = self.padding;
        let mut out = zeros(self.samples * self.input[0] * dp * hp * wp);
        out.par_chunks_mut(dp * hp * wp)
            .zip(x.par_chunks(d * h * w))
            .for_each(|(o, i)| {
                for z in 0..d {
                    for y in 0..h {
                        let src = (z * h + y) * w;
                        let dst = ((z + pd) * hp + y + ph) * wp + pw;
                        o[dst..dst + w].copy_from_slice(&i[src..src + w]);
                    }
                }
            });
        out
    }

    /// Columns per tile: the tile's column block (C·T × L) holds about `values` values
    /// (2^17 = 512 KiB, within L2, for the forward pass; the weight gradient's products take
    /// their inner dimension from L and want it longer).
    fn tile_len(&self, values: usize) -> usize {
        (values / (self.input[0] * self.taps()).max(1)).clamp(32, 4096)
    }

    /// Tiles `(sample, q0, q1)`: ranges of padded offsets covering every output voxel
    /// (`q = z·Hp·Wp + y·Wp + x`); offsets in the padding between rows are computed and
    /// dropped.
    fn tiles(&self, len: usize) -> Vec<(usize, usize, usize)> {
        let [od, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        let end = (od - 1) * hp * wp + (oh - 1) * wp + ow;
        let mut t = Vec::new();
        for n in 0..self.samples {
            let mut q = 0;
            while q < end {
                t.push((n, q, (q + len).min(end)));
                q += len;
            }
        }
        t
    }

    /// Calls `f(q, at, count)` for every run of output voxels in `q0..q1`: `count` voxels
    /// from padded offset `q`, at `at` in one channel of the sample's output.
    fn runs(&self, q0: usize, q1: usize, mut f: impl FnMut(usize, usize, usize)) {
        let [od, oh, ow] = self.output();
        let [_, hp, wp] = self.padded();
        for r in q0 / wp..=(q1 - 1) / wp {
            let (z, y) = (r / hp, r % hp);
            if z >= od || y >= oh {
                continue;
            }
            let start = q0.max(r * wp);
            let stop = q1.min(r * wp + ow);
            if start < stop {
                f(start, (z * oh + y) * ow + start - r * wp, stop - start);
            }
        }
    }

    /// The column block of a tile: row `c·T + t` holds `xp[c, q0 + off(t) ..][.. len]`,
    /// contiguous in the padded input.
    fn columns(&self, xp: &[f32], offsets: &[usize], q0: usize, len: usize, cols: &mut [f32]) {
        let vp: usize = self.padded().iter().product();
        let t_n = offsets.len();
        for c in 0..self.input[0] {
            let channel = &xp[c * vp..(c + 1) * vp];
            for (t, &off) in offsets.iter().enumerate() {
                cols[(c * t_n + t) * len..][..len]
                    .copy_from_slice(&channel[q0 + off..q0 + off + len]);
            }
        }
    }

    /// `y = conv(x, w)` for all samples: `x` `(N, C, D, H, W)`, `w` `(O, C, kd, kh, kw)`.
    pub fn forward(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        match self.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 if self.channels_last_pays() => self.forward_channels_last(x, w),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => self.forward_slabs(x, w, &avx512::KERNELS),
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => self.forward_amx(x, w),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => self.forward_slabs(x, w, &avx2::KERNELS),
            _ => self.forward_gemm(x, w),
        }
    }

    /// The weight gradient `Σ_n Σ_q dy[o, q] · xp[c, q + off(t)]`, `(O, C, kd, kh, kw)`,
    /// summed in a fixed order (the same bits for any thread count).
    pub fn weight_grad(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        match self.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 if self.channels_last_grad_pays() => {
                self.weight_grad_channels_last(x, dy)
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => self.weight_grad_slabs(x, dy, &avx512::KERNELS),
            #[cfg(target_arch = "x86_64")]
            Backend::Amx => self.weight_grad_amx(x, dy),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => self.weight_grad_slabs(x, dy, &avx2::KERNELS),
            _ => self.weight_grad_gemm(x, dy),
        }
    }

    /// [`Direct::forward`] by column blocks and `gemm`.
    fn forward_gemm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let c_n = self.input[0];
        let [od, oh, ow] = self.output();
        let vp: usize = self.padded().iter().product();
        let (o_n, k) = (self.out_channels, c_n * self.taps());
        let offsets = self.offsets();
        let volume = od * oh * ow;
        let mut out = zeros(self.samples * o_n * volume);
        let xp = self.pad(x);
        let dst_all = Shared(out.as_mut_ptr());
        let len_max = self.tile_len(FORWARD_TILE);
        self.tiles(len_max).par_iter().for_each_init(
            || (vec![0f32; k * len_max], vec![0f32; o_n * len_max]),
            |(cols, tile), &(n, q0, q1)| {
                let len = q1 - q0;
                self.columns(&xp[n * c_n * vp..][..c_n * vp], &offsets, q0, len, cols);
                // SAFETY: lhs = w, O × K row-major (w.len() = O·K, checked in `cpu_fwd`);
                // rhs = cols, K × len;
                // dst = tile, O × len; both buffers hold K·L_max ≥ K·len and O·L_max values.
                unsafe {
                    gemm::gemm(
                        o_n,
                        len,
                        k,
                        tile.as_mut_ptr(),
                        1,
                        len as isize,
                        false,
                        w.as_ptr(),
                        1,
                        k as isize,
                        cols.as_ptr(),
                        1,
                        len as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                let dst = dst_all.get();
                self.runs(q0, q1, |q, at, count| {
                    for o in 0..o_n {
                        let src = &tile[o * len + q - q0..][..count];
                        // SAFETY: voxels `at..at + count` of channel o of sample n: inside the
                        // output, and written by this tile only (tiles partition the offsets).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src.as_ptr(),
                                dst.add((n * o_n + o) * volume + at),
                                count,
                            );
                        }
                    }
                });
            },
        );
        out
    }

    /// [`Direct::weight_grad`] by column blocks and `gemm`.
    fn weight_grad_gemm(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let c_n = self.input[0];
        let [od, oh, ow] = self.output();
        let vp: usize = self.padded().iter().product();
        let (o_n, k) = (self.out_channels, c_n * self.taps());
        let offsets = self.offsets();
        let volume = od * oh * ow;
        let xp = self.pad(x);
        let len_max = self.tile_len(WEIGHT_GRAD_TILE);
        let tiles = self.tiles(len_max);
        // fixed groups of tiles, each summed sequentially, then the groups in order
        let group = tiles.len().div_ceil(16).max(1);
        let partials: Vec<Vec<f32>> = tiles
            .par_chunks(group)
            .map(|chunk| {
                let mut acc = vec![0f32; o_n * k];
                let mut cols = vec![0f32; k * len_max];
                let mut tile = vec![0f32; o_n * len_max];
                for &(n, q0, q1) in chunk {
                    let len = q1 - q0;
                    self.columns(
                        &xp[n * c_n * vp..][..c_n * vp],
                        &offsets,
                        q0,
                        len,
                        &mut cols,
                    );
                    // the output gradient at padded offsets, zero between rows
                    tile[..o_n * len].fill(0.0);
                    self.runs(q0, q1, |q, at, count| {
                        for o in 0..o_n {
                            tile[o * len + q - q0..][..count]
                                .copy_from_slice(&dy[(n * o_n + o) * volume + at..][..count]);
                        }
                    });
                    // (O × K) += tile (O × len) · cols^T (len × K)
                    // SAFETY: dst = acc, O × K; lhs = tile, O × len; rhs = cols read as
                    // len × K (element (j, r) at r·len + j), all within their buffers.
                    unsafe {
                        gemm::gemm(
                            o_n,
                            k,
                            len,
                            acc.as_mut_ptr(),
                            1,
                            k as isize,
                            true,
                            tile.as_ptr(),
                            1,
                            len as isize,
                            cols.as_ptr(),
                            len as isize,
                            1,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                }
                acc
            })
            .collect();
        let mut total = vec![0f32; o_n * k];
        for p in &partials {
            for (a, b) in total.iter_mut().zip(p) {
                *a += b;
            }
        }
        // (O, C·T) is already (O, C, kd, kh, kw)
        total
    }

    /// The convolution that maps the output gradient to the input gradient: same kernel
    /// size and dilation, padding `dilation·(k − 1) − padding`, O ↔ C; `None` when that
    /// padding would be negative.
    pub fn transposed(&self) -> Option<Direct> {
        self.check().ok()?;
        let [od, oh, ow] = self.output();
        let mut padding = [0; 3];
        for (a, p) in padding.iter_mut().enumerate() {
            let full = self.dilation[a] * (self.kernel[a] - 1);
            *p = full.checked_sub(self.padding[a])?;
        }
        let t = Direct {
            input: [self.out_channels, od, oh, ow],
            kernel: self.kernel,
            padding,
            dilation: self.dilation,
            out_channels: self.input[0],
            samples: self.samples,
            backend: self.backend,
        };
        (t.output() == [self.input[1], self.input[2], self.input[3]]).then_some(t)
    }

    /// `w (O, C, kd, kh, kw)` → the flipped, transposed kernel `(C, O, kd, kh, kw)`.
    pub fn flip_transpose(&self, w: &[f32]) -> Vec<f32> {
        let (o_n, c_n, t_n) = (self.out_channels, self.input[0], self.taps());
        let mut out = zeros(w.len());
        for o in 0..o_n {
            for c in 0..c_n {
                for t in 0..t_n {
                    out[(c * o_n + o) * t_n + (t_n - 1 - t)] = w[(o * c_n + c) * t_n + t];
                }
            }
        }
        out
    }
}

/// The custom op over `(x, w)`, or `(x, w, b)` with the bias `(O,)` added in the same op (one
/// autograd node instead of two: candle adds a zero tensor and an addition per node in its
/// backward pass); `w` is `(O, C, kd, kh, kw)`.
pub(crate) struct Conv3dDirect(pub Direct);

impl Conv3dDirect {
    /// `conv(x, w)` from the storages, lengths checked against the geometry.
    fn output(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<Vec<f32>> {
        let (x, w) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let g = &self.0;
        // the raw products below rely on these lengths
        let (input, weights, _) = g.lengths();
        if x.len() != input || w.len() != weights {
            bail!("conv3d (direct): input or weight size does not match the geometry");
        }
        Ok(g.forward(x, w))
    }

    fn shape(&self) -> Shape {
        let g = &self.0;
        let [od, oh, ow] = g.output();
        Shape::from((g.samples, g.out_channels, od, oh, ow))
    }

    /// `(dx, dw)`: the transposed convolution of the output gradient with the flipped kernel,
    /// and the weight gradient, each only where candle's graph tracks that argument
    /// (`track_op`): a network's first convolution reads the data, whose gradient no one uses.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = &self.0;
        let dx = if x.track_op() {
            let Some(t) = g.transposed() else {
                bail!("conv3d (direct): no transposed geometry; choose the vol2col path");
            };
            let ws: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let (o_n, c_n) = (g.out_channels, g.input[0]);
            let flipped = Tensor::from_vec(
                g.flip_transpose(&ws),
                (c_n, o_n, ws.len() / (o_n * c_n).max(1)),
                w.device(),
            )?;
            Some(grad.apply_op2_no_bwd(&flipped, &Conv3dDirect(t))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(
                x.contiguous()?
                    .apply_op2_no_bwd(grad, &WeightGrad(*g))?
                    .reshape(w.shape())?,
            )
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp2 for Conv3dDirect {
    fn name(&self) -> &'static str {
        "cwseg-conv3d-direct"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.output(s1, l1, s2, l2)?), self.shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, &grad.contiguous()?)
    }
}

impl candle_core::CustomOp3 for Conv3dDirect {
    fn name(&self) -> &'static str {
        "cwseg-conv3d-direct-bias"
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
        let mut y = self.output(s1, l1, s2, l2)?;
        let bias = f32_slice(s3, l3)?;
        if bias.len() != self.0.out_channels {
            bail!(
                "conv3d (direct): {} bias values for {} output channels",
                bias.len(),
                self.0.out_channels
            );
        }
        shift_channels(&mut y, self.0.output().iter().product(), bias);
        Ok((CpuStorage::F32(y), self.shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = self.grads(x, w, &grad)?;
        let db = channel_sums(&grad)?.reshape(b.shape())?;
        Ok((dx, dw, Some(db)))
    }
}

/// The weight gradient as an op over `(x, dy)`, reading both in place.
struct WeightGrad(Direct);

impl candle_core::CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "cwseg-conv3d-direct-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let g = &self.0;
        let shape = Shape::from((g.out_channels, g.input[0] * g.taps()));
        let (input, _, output) = g.lengths();
        if x.len() != input || dy.len() != output {
            bail!("conv3d weight gradient: input or gradient size does not match the geometry");
        }
        Ok((CpuStorage::F32(g.weight_grad(x, dy)), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-5 * scale, "{what}: worst {worst} of {scale}");
    }

    /// The backends this CPU runs besides `gemm`.
    fn vector_backends() -> Vec<Backend> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                v.push(Backend::Avx2);
            }
            if avx512::available() {
                v.push(Backend::Avx512);
            }
        }
        v
    }

    /// The AVX-512 and AVX2 kernels (those this CPU has) against the `gemm` path on geometries
    /// with remainders everywhere: channels not a multiple of 4, 8 or 16, rows not a multiple
    /// of 8 or 16 voxels (row chunks and packed chunks), kernels 1, 3 and 5, dilation,
    /// asymmetric padding, two samples; both the convolution and its transpose (the input
    /// gradient's geometry).
    #[test]
    fn vector_kernels_match_gemm() {
        let backends = vector_backends();
        if backends.is_empty() {
            eprintln!("neither AVX-512 nor AVX2 on this CPU: the gemm path alone runs");
        }
        for backend in backends {
            kernels_match_gemm(backend);
        }
    }

    /// The AMX bf16 kernel (where this machine runs it) against the `gemm` path on the same
    /// input and weights rounded to bf16: both accumulate exact products of bf16 values in
    /// f32, so they differ by the summation order alone (1e-5 of the largest output). Every
    /// geometry of `kernels_match_gemm` (channel counts 2 to 40: one partial tile of pairs,
    /// tiles of 32 with zeros after the last channel; output channels not a multiple of 16)
    /// and the transposes.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn amx_matches_gemm_on_bf16_inputs() {
        if !amx_available() {
            eprintln!("no AMX-BF16 on this machine: the bf16 kernel is not run");
            return;
        }
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| crate::bf16::round_bf16(x)).collect() };
        for (i, (input, kernel, padding, dilation, out_channels, samples)) in
            CASES.into_iter().enumerate()
        {
            let gemm = Direct {
                input,
                kernel,
                padding,
                dilation,
                out_channels,
                samples,
                backend: Backend::Gemm,
            };
            let amx = Direct {
                backend: Backend::Amx,
                ..gemm
            };
            let (nx, nw, ny) = gemm.lengths();
            let x = random(nx, i as u64);
            let w = random(nw, 100 + i as u64);
            let dy = random(ny, 200 + i as u64);
            let what = |part: &str| format!("AMX case {i}: {part}");
            close(
                &amx.forward(&x, &w),
                &gemm.forward(&round(&x), &round(&w)),
                &what("forward"),
            );
            close(
                &amx.weight_grad(&x, &dy),
                &gemm.weight_grad(&round(&x), &round(&dy)),
                &what("weight gradient"),
            );
            if let Some(t) = amx.transposed() {
                let flipped = amx.flip_transpose(&w);
                let g = Direct {
                    backend: Backend::Gemm,
                    ..t
                };
                close(
                    &t.forward(&dy, &flipped),
                    &g.forward(&round(&dy), &round(&flipped)),
                    &what("input gradient"),
                );
            }
        }
    }

    /// Geometries with remainders everywhere: (input, kernel, padding, dilation, O, samples).
    #[allow(clippy::type_complexity)]
    const CASES: [([usize; 4], [usize; 3], [usize; 3], [usize; 3], usize, usize); 16] = [
        ([3, 7, 9, 37], [3, 3, 3], [1, 1, 1], [1, 1, 1], 5, 2),
        ([16, 6, 5, 16], [3, 3, 3], [1, 1, 1], [1, 1, 1], 16, 1),
        ([2, 9, 8, 20], [5, 5, 5], [2, 2, 2], [1, 1, 1], 33, 2),
        ([4, 10, 11, 12], [3, 3, 3], [2, 2, 2], [2, 2, 2], 17, 1),
        ([13, 4, 5, 6], [1, 1, 1], [0, 0, 0], [1, 1, 1], 3, 2),
        ([5, 8, 6, 40], [3, 1, 3], [1, 0, 2], [1, 1, 1], 12, 2),
        // rows of 4 voxels: packed chunks across rows, 10 blocks of input channels
        ([40, 4, 4, 4], [3, 3, 3], [1, 1, 1], [1, 1, 1], 20, 2),
        // slabs of several planes (5 per slab; 4 per slab and a last one of 1), packed
        // and row chunks
        ([2, 40, 6, 8], [3, 3, 3], [1, 1, 1], [1, 1, 1], 9, 2),
        ([3, 33, 4, 16], [3, 3, 3], [1, 1, 1], [1, 1, 1], 8, 2),
        // 70 channels: three tiles of 32 channel pairs' worth, the last mostly zeros
        ([70, 5, 6, 7], [3, 3, 3], [1, 1, 1], [1, 1, 1], 40, 1),
        // dead taps: rows of 16 whose border rows share tiles (2, 3, 3, 3, 3, 2 chunks) and
        // skip their planes and rows of taps in the padding
        ([6, 16, 16, 16], [5, 5, 5], [2, 2, 2], [1, 1, 1], 9, 2),
        // packed chunks spanning rows with different live taps
        ([20, 8, 8, 8], [5, 5, 5], [2, 2, 2], [1, 1, 1], 12, 1),
        // padding beyond the kernel's reach: output rows with no live tap at all
        ([3, 2, 3, 5], [3, 3, 3], [3, 3, 3], [1, 1, 1], 4, 2),
        // channels-last kernels (AVX-512, 8³-like maps): channels not a multiple of 6, 16 or
        // 48, a voxel block across rows, dilation
        ([21, 8, 8, 8], [3, 3, 3], [1, 1, 1], [1, 1, 1], 37, 2),
        ([18, 5, 7, 8], [3, 3, 3], [2, 2, 2], [2, 2, 2], 70, 1),
        // and a long reduction (C·T = 16 000) on planes of 120 voxels
        ([128, 4, 10, 12], [5, 5, 5], [2, 2, 2], [1, 1, 1], 16, 1),
    ];

    fn kernels_match_gemm(backend: Backend) {
        let cases = CASES;
        for (i, (input, kernel, padding, dilation, out_channels, samples)) in
            cases.into_iter().enumerate()
        {
            let gemm = Direct {
                input,
                kernel,
                padding,
                dilation,
                out_channels,
                samples,
                backend: Backend::Gemm,
            };
            gemm.check().expect("valid geometry");
            let fast = Direct { backend, ..gemm };
            let (nx, nw, ny) = gemm.lengths();
            let x = random(nx, i as u64);
            let w = random(nw, 100 + i as u64);
            let dy = random(ny, 200 + i as u64);
            let what = |part: &str| format!("{backend:?} case {i}: {part}");
            close(
                &fast.forward(&x, &w),
                &gemm.forward(&x, &w),
                &what("forward"),
            );
            close(
                &fast.weight_grad(&x, &dy),
                &gemm.weight_grad(&x, &dy),
                &what("weight gradient"),
            );
            if let Some(t) = fast.transposed() {
                let flipped = fast.flip_transpose(&w);
                let g = Direct {
                    backend: Backend::Gemm,
                    ..t
                };
                close(
                    &t.forward(&dy, &flipped),
                    &g.forward(&dy, &flipped),
                    &what("input gradient"),
                );
            }
        }
    }
}
