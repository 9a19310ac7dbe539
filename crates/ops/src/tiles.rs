//! vol2col over tiles of live taps: `conv3d` on small maps, where many kernel taps read only
//! padding for part of the output. Along each axis the outputs are grouped into segments whose
//! taps reading the input (the *live* taps, a contiguous range) are the same; a tile is one
//! segment per axis. Each tile unfolds only its live taps, for all samples at once (columns
//! `(n, z, y, x)`), and one `gemm` per tile computes it into a buffer that is then scattered
//! into the output. The work done is `Σ_tiles C·|live taps|·N·|tile|` against vol2col's
//! `C·T·N·D·H·W`: DeepLabV3's ASPP branch of dilation 6 on an 8³ map does 1/8 of it, a 3³
//! kernel with padding 1 on 8³ 0.77, a 5³ kernel with padding 2 on 4³ 0.34 (oneDNN skips these
//! taps too); `conv3d` takes the tiles where they do at most 0.35 of it and gather at most 8
//! kernels' worth of weights ([`TiledConv::pays`]: the 5³ kernel on 4³ would gather 22). The backward recomputes each tile's columns: `dW_live = dY_tile · colsᵀ` added
//! into the weight gradient's live entries, `dcols = W_liveᵀ · dY_tile` folded onto the input
//! gradient.
//!
//! `unsafe` only for [`product`] (the `gemm` crate's raw pointers): every matrix is a buffer
//! allocated here at the size of its product.
#![allow(unsafe_code)]

use std::ops::Range;

use candle_core::{Result, Shape, bail};
use rayon::prelude::*;

use crate::vol2col::{ColumnConv, Grads, Needed, View, Write, product};

/// Outputs along one axis whose live taps are the same range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    out: Range<usize>,
    taps: Range<usize>,
}

/// One axis of a convolution: input length, kernel, stride, padding, dilation, output length.
#[derive(Debug, Clone, Copy)]
struct Axis {
    n: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    out: usize,
}

impl Axis {
    /// The input index tap `e` of output `o` reads, if it is inside the input.
    fn input(&self, o: usize, e: usize) -> Option<usize> {
        (o * self.s + e * self.d)
            .checked_sub(self.p)
            .filter(|&i| i < self.n)
    }

    /// The taps of output `o` that read the input (a contiguous range: the read index grows
    /// with the tap).
    fn live(&self, o: usize) -> Range<usize> {
        let first = (0..self.k).find(|&e| self.input(o, e).is_some());
        match first {
            None => 0..0,
            Some(lo) => {
                let hi = (lo..self.k)
                    .take_while(|&e| self.input(o, e).is_some())
                    .count();
                lo..lo + hi
            }
        }
    }

    /// Consecutive outputs with the same live taps; outputs without any are left out (they
    /// stay zero).
    fn segments(&self) -> Vec<Segment> {
        let mut segments: Vec<Segment> = Vec::new();
        for o in 0..self.out {
            let taps = self.live(o);
            match segments.last_mut() {
                Some(last) if last.taps == taps && last.out.end == o => last.out.end = o + 1,
                _ => segments.push(Segment {
                    out: o..o + 1,
                    taps,
                }),
            }
        }
        segments.retain(|s| !s.taps.is_empty());
        segments
    }
}

/// One tile: an output range and its live taps per axis `[z, y, x]`.
#[derive(Debug, Clone)]
struct Tile {
    out: [Range<usize>; 3],
    taps: [Range<usize>; 3],
}

impl Tile {
    fn taps(&self) -> usize {
        self.taps.iter().map(|t| t.len()).product()
    }

    fn voxels(&self) -> usize {
        self.out.iter().map(|o| o.len()).product()
    }
}

/// A convolution computed tile by tile (module docs): input `(N, C, D, H, W)`, weight
/// `(O, C·kd·kh·kw)`.
#[derive(Debug, Clone)]
pub(crate) struct TiledConv {
    axes: [Axis; 3],
    channels: usize,
    samples: usize,
    out_channels: usize,
    tiles: Vec<Tile>,
}

/// Largest column matrix of one tile, in values (32 MiB in f32).
const MAX_TILE_COLUMNS: usize = 1 << 23;
/// The tiles pay where they do at most this fraction of vol2col's work: each tile is its own
/// small `gemm` (the live weights gathered and packed again), so skipping a quarter of the
/// work loses (DeepLabV3's 128-channel 3³ layer on 8³, fraction 0.77, forward + backward 28.8
/// → 74.8 ms; its dilation-2 layer, 0.58, 81 → 129 ms) where skipping seven eighths wins (the
/// ASPP branch of dilation 6, 0.125: 42.0 → 20.4 ms; 2-core AMD EPYC, 2026-12-07).
const MAX_LIVE_FRACTION: f64 = 0.35;
/// Every tile gathers and packs its live weights: at most this many kernels' worth in all
/// (the ASPP branch above gathers 4.6; V-Net's 256-channel 5³ layer on 4³, 64 tiles, would
/// gather 22 and took 1105 ms instead of 49).
const MAX_GATHERED_KERNELS: usize = 8;

impl TiledConv {
    /// The tiles of a convolution of `samples` inputs `(C, D, H, W)` with `out_channels`
    /// kernels of `kernel`, and per-axis stride, padding and dilation.
    pub(crate) fn new(
        input: [usize; 4],
        kernel: [usize; 3],
        (stride, padding, dilation): ([usize; 3], [usize; 3], [usize; 3]),
        output: [usize; 3],
        (samples, out_channels): (usize, usize),
    ) -> Self {
        let axes: [Axis; 3] = std::array::from_fn(|a| Axis {
            n: input[1 + a],
            k: kernel[a],
            s: stride[a],
            p: padding[a],
            d: dilation[a],
            out: output[a],
        });
        let [sz, sy, sx] = axes.map(|a| a.segments());
        let mut tiles = Vec::new();
        for z in &sz {
            for y in &sy {
                for x in &sx {
                    tiles.push(Tile {
                        out: [z.out.clone(), y.out.clone(), x.out.clone()],
                        taps: [z.taps.clone(), y.taps.clone(), x.taps.clone()],
                    });
                }
            }
        }
        TiledConv {
            axes,
            channels: input[0],
            samples,
            out_channels,
            tiles,
        }
    }

    /// Whether the tiles beat vol2col: they skip enough dead taps, gather few enough weights,
    /// each tile's columns fit, and no size is zero.
    pub(crate) fn pays(&self) -> bool {
        let taps: usize = self.axes.iter().map(|a| a.k).product();
        let voxels: usize = self.axes.iter().map(|a| a.out).product();
        let full = (taps * voxels) as f64;
        let live: usize = self.tiles.iter().map(|t| t.taps() * t.voxels()).sum();
        let largest = self
            .tiles
            .iter()
            .map(|t| self.channels * t.taps() * self.samples * t.voxels())
            .max()
            .unwrap_or(0);
        let gathered: usize = self.tiles.iter().map(Tile::taps).sum();
        let sized = self.samples > 0 && self.channels > 0 && self.out_channels > 0;
        sized
            && full > 0.0
            && (live as f64) <= MAX_LIVE_FRACTION * full
            && gathered <= MAX_GATHERED_KERNELS * taps
            && largest <= MAX_TILE_COLUMNS
    }

    fn volume(&self) -> usize {
        self.axes.iter().map(|a| a.n).product()
    }

    fn output_volume(&self) -> usize {
        self.axes.iter().map(|a| a.out).product()
    }

    fn kernel_taps(&self) -> usize {
        self.axes.iter().map(|a| a.k).product()
    }

    /// Every (column, input index) pair of tile `t` for one row `(a, b, e)` of live taps and
    /// one sample: `f(column within the sample, voxel index within the channel)`.
    fn visit_row(&self, t: &Tile, [a, b, e]: [usize; 3], mut f: impl FnMut(usize, usize)) {
        let [az, ay, ax] = self.axes;
        let (py, px) = (t.out[1].len(), t.out[2].len());
        for (z, oz) in t.out[0].clone().enumerate() {
            let Some(iz) = az.input(oz, a) else { continue };
            for (y, oy) in t.out[1].clone().enumerate() {
                let Some(iy) = ay.input(oy, b) else { continue };
                let row = (iz * ay.n + iy) * ax.n;
                for (x, ox) in t.out[2].clone().enumerate() {
                    if let Some(ix) = ax.input(ox, e) {
                        f((z * py + y) * px + x, row + ix);
                    }
                }
            }
        }
    }

    /// The live taps of tile `t` as `(a, b, e)` kernel indices, in row order.
    fn tap_list(t: &Tile) -> Vec<[usize; 3]> {
        let mut taps = Vec::with_capacity(t.taps());
        for a in t.taps[0].clone() {
            for b in t.taps[1].clone() {
                for e in t.taps[2].clone() {
                    taps.push([a, b, e]);
                }
            }
        }
        taps
    }

    /// Tile `t`'s columns: rows `(c, live tap)`, columns `(n, z, y, x)`.
    fn unfold<T: candle_core::WithDType>(&self, t: &Tile, x: &[T]) -> Vec<T> {
        let taps = Self::tap_list(t);
        let (p, volume) = (t.voxels(), self.volume());
        let width = self.samples * p;
        let mut cols = vec![T::zero(); self.channels * taps.len() * width];
        cols.par_chunks_mut(taps.len() * width)
            .enumerate()
            .for_each(|(c, block)| {
                for (r, &tap) in taps.iter().enumerate() {
                    for n in 0..self.samples {
                        let channel = &x[(n * self.channels + c) * volume..][..volume];
                        let out = &mut block[r * width + n * p..][..p];
                        self.visit_row(t, tap, |j, i| out[j] = channel[i]);
                    }
                }
            });
        cols
    }

    /// Adds tile `t`'s column gradient onto the input gradient `dx` `(N, C, D, H, W)`.
    fn fold_into<T: candle_core::WithDType>(&self, t: &Tile, dcols: &[T], dx: &mut [T]) {
        let taps = Self::tap_list(t);
        let (p, volume) = (t.voxels(), self.volume());
        let width = self.samples * p;
        dx.par_chunks_mut(volume)
            .enumerate()
            .for_each(|(i, channel)| {
                let (n, c) = (i / self.channels, i % self.channels);
                for (r, &tap) in taps.iter().enumerate() {
                    let cols = &dcols[(c * taps.len() + r) * width + n * p..][..p];
                    self.visit_row(t, tap, |j, i| channel[i] += cols[j]);
                }
            });
    }

    /// The weight columns of tile `t`'s live taps: `(O, C·live)` from `(O, C·kd·kh·kw)`.
    fn live_weights<T: candle_core::WithDType>(&self, t: &Tile, w: &[T]) -> Vec<T> {
        let index = self.live_index(t);
        let rows = self.channels * self.kernel_taps();
        let mut out = vec![T::zero(); self.out_channels * index.len()];
        out.par_chunks_mut(index.len().max(1))
            .zip(w.par_chunks(rows.max(1)))
            .for_each(|(live, row)| {
                for (v, &k) in live.iter_mut().zip(&index) {
                    *v = row[k];
                }
            });
        out
    }

    /// Adds `(O, C·live)` onto the weight gradient's live entries.
    fn add_live_weights<T: candle_core::WithDType>(&self, t: &Tile, live: &[T], dw: &mut [T]) {
        let index = self.live_index(t);
        let rows = self.channels * self.kernel_taps();
        dw.par_chunks_mut(rows)
            .zip(live.par_chunks(index.len()))
            .for_each(|(row, values)| {
                for (&k, &v) in index.iter().zip(values) {
                    row[k] += v;
                }
            });
    }

    /// Each live row's index in the full kernel, `c·T + (a·kh + b)·kw + e`.
    fn live_index(&self, t: &Tile) -> Vec<usize> {
        let [_, kh, kw] = self.axes.map(|a| a.k);
        let taps = Self::tap_list(t);
        (0..self.channels)
            .flat_map(|c| {
                taps.iter()
                    .map(move |&[a, b, e]| c * self.kernel_taps() + (a * kh + b) * kw + e)
            })
            .collect()
    }

    /// Every output voxel of tile `t` as `(column within the sample, index within a channel)`.
    fn tile_voxels(&self, t: &Tile) -> Vec<(usize, usize)> {
        let [_, ay, ax] = self.axes.map(|a| a.out);
        let mut voxels = Vec::with_capacity(t.voxels());
        for z in t.out[0].clone() {
            for y in t.out[1].clone() {
                for x in t.out[2].clone() {
                    voxels.push((voxels.len(), (z * ay + y) * ax + x));
                }
            }
        }
        voxels
    }

    /// Writes `(O, N·P)` values of tile `t` into the output `(N, O, Do, Ho, Wo)`.
    fn scatter<T: candle_core::WithDType>(&self, t: &Tile, tile: &[T], y: &mut [T]) {
        let voxels = self.tile_voxels(t);
        let (p, width) = (t.voxels(), self.samples * t.voxels());
        y.par_chunks_mut(self.output_volume())
            .enumerate()
            .for_each(|(i, channel)| {
                let (n, o) = (i / self.out_channels, i % self.out_channels);
                let values = &tile[o * width + n * p..][..p];
                for &(j, v) in &voxels {
                    channel[v] = values[j];
                }
            });
    }

    /// Tile `t`'s values of `(N, O, Do, Ho, Wo)` as `(O, N·P)`.
    fn gather<T: candle_core::WithDType>(&self, t: &Tile, gy: &[T]) -> Vec<T> {
        let voxels = self.tile_voxels(t);
        let (p, width) = (t.voxels(), self.samples * t.voxels());
        let volume = self.output_volume();
        let mut out = vec![T::zero(); self.out_channels * width];
        out.par_chunks_mut(width).enumerate().for_each(|(o, row)| {
            for n in 0..self.samples {
                let channel = &gy[(n * self.out_channels + o) * volume..][..volume];
                for &(j, v) in &voxels {
                    row[n * p + j] = channel[v];
                }
            }
        });
        out
    }

    fn check<T>(&self, x: &[T], w: &[T], gy: Option<&[T]>) -> Result<()> {
        let fits = x.len() == self.samples * self.channels * self.volume()
            && w.len() == self.out_channels * self.channels * self.kernel_taps()
            && gy
                .is_none_or(|g| g.len() == self.samples * self.out_channels * self.output_volume());
        if !fits {
            bail!(
                "conv3d (tiles): {} input and {} weight values do not match {} samples of {} channels → {}",
                x.len(),
                w.len(),
                self.samples,
                self.channels,
                self.out_channels
            );
        }
        Ok(())
    }
}

impl ColumnConv for TiledConv {
    fn output_shape(&self) -> Shape {
        let [d, h, w] = self.axes.map(|a| a.out);
        Shape::from((self.samples, self.out_channels, d, h, w))
    }

    fn forward<T: candle_core::WithDType>(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        self.check(x, w, None)?;
        let o = self.out_channels;
        let mut y = vec![T::zero(); self.samples * o * self.output_volume()];
        for t in &self.tiles {
            let cols = self.unfold(t, x);
            let weights = self.live_weights(t, w);
            let (k, width) = (weights.len() / o, self.samples * t.voxels());
            let mut tile = vec![T::zero(); o * width];
            // SAFETY: tile is o × width, weights o × k, cols k × width (their lengths).
            unsafe {
                product(
                    [o, width, k],
                    View::rows(tile.as_mut_ptr(), width),
                    View::rows(weights.as_ptr(), k),
                    View::rows(cols.as_ptr(), width),
                    Write::Overwrite,
                );
            }
            self.scatter(t, &tile, &mut y);
        }
        Ok(y)
    }

    fn backward<T: candle_core::WithDType>(
        &self,
        x: &[T],
        w: &[T],
        gy: &[T],
        needed: Needed,
    ) -> Result<Grads<T>> {
        self.check(x, w, Some(gy))?;
        let o = self.out_channels;
        let mut dx = needed.input.then(|| vec![T::zero(); x.len()]);
        let mut dw = needed.weight.then(|| vec![T::zero(); w.len()]);
        for t in &self.tiles {
            let g = self.gather(t, gy);
            let width = self.samples * t.voxels();
            let k = self.channels * t.taps();
            if let Some(dw) = dw.as_mut() {
                let cols = self.unfold(t, x);
                let mut live = vec![T::zero(); o * k];
                // SAFETY: live is o × k, g o × width, cols k × width read transposed.
                unsafe {
                    product(
                        [o, k, width],
                        View::rows(live.as_mut_ptr(), k),
                        View::rows(g.as_ptr(), width),
                        View::columns(cols.as_ptr(), width),
                        Write::Overwrite,
                    );
                }
                self.add_live_weights(t, &live, dw);
            }
            if let Some(dx) = dx.as_mut() {
                let weights = self.live_weights(t, w);
                let mut dcols = vec![T::zero(); k * width];
                // SAFETY: dcols is k × width, weights o × k read transposed, g o × width.
                unsafe {
                    product(
                        [k, width, o],
                        View::rows(dcols.as_mut_ptr(), width),
                        View::columns(weights.as_ptr(), k),
                        View::rows(g.as_ptr(), width),
                        Write::Overwrite,
                    );
                }
                self.fold_into(t, &dcols, dx);
            }
        }
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(n: usize, k: usize, s: usize, p: usize, d: usize) -> Axis {
        let out = (n + 2 * p - d * (k - 1) - 1) / s + 1;
        Axis { n, k, s, p, d, out }
    }

    #[test]
    fn segments_group_outputs_by_live_taps() {
        // 3 taps, padding 1, on 8: the first output misses tap 0, the last tap 2
        let s = axis(8, 3, 1, 1, 1).segments();
        assert_eq!(
            s,
            vec![
                Segment {
                    out: 0..1,
                    taps: 1..3
                },
                Segment {
                    out: 1..7,
                    taps: 0..3
                },
                Segment {
                    out: 7..8,
                    taps: 0..2
                },
            ]
        );
        // dilation 6 on 8: outer taps live only for the two outputs at each end
        let s = axis(8, 3, 1, 6, 6).segments();
        assert_eq!(
            s,
            vec![
                Segment {
                    out: 0..2,
                    taps: 1..3
                },
                Segment {
                    out: 2..6,
                    taps: 1..2
                },
                Segment {
                    out: 6..8,
                    taps: 0..2
                },
            ]
        );
    }
}
