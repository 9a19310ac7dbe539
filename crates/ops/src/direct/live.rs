//! Live taps of the direct convolution's tiles. A tap `(a, b, e)` of output row `(z, y)`
//! reads padded input plane `z + a·dil_d` and row `y + b·dil_h`; where that plane or row lies
//! in the padding every value it reads is zero, and the tap adds nothing to the tile's sums
//! (`acc + w·0 = acc`). The slab drivers skip those taps — on a 16³ map with a 5³ kernel
//! 7.5 % of the taps per axis are in the padding, on 8³ 15 % — as oneDNN does. The x axis is
//! not skipped: a chunk's lanes are consecutive voxels of a row.
//!
//! A tile's live taps are the product of its live planes (bits over `a`) and its live rows
//! (bits over `b`): the union over the rows its chunks cover. Tiles are cut so that rows with
//! the same live taps share a tile: a plane's chunks in runs of equal bits (a run of one chunk
//! joins its neighbour), each run split into the fewest tiles of at most the kernel's chunks,
//! sizes as even as possible (16 rows in tiles of 3: 3, 3, 3, 3, 2, 2, where a flat cut
//! leaves a last tile of 1 chunk and 2 empty ones whose products the kernel still computes).

use super::Direct;
use super::slab::Chunk;

/// Bits over one kernel axis, bit `i` set where tap `i` of that axis reads inside the input
/// (kernels longer than 64 taps on an axis count every tap from the 64th on as live).
pub(super) type Bits = u64;

/// Whether tap `i` is set in `bits`.
pub(super) fn has(bits: Bits, i: usize) -> bool {
    bits >> i.min(63) & 1 == 1
}

/// One (c, t) step of a forward tile: the offset of its input from a voxel's own padded
/// offset within the slab, and the row `k = c·T + t` of its weights.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    pub offset: usize,
    pub k: usize,
}

/// The live steps of each (planes, rows) bits met in one slab, each list made once.
#[derive(Default)]
pub(super) struct StepLists {
    lists: Vec<((Bits, Bits), Vec<Step>)>,
}

impl StepLists {
    /// The live steps for `(planes, rows)` ([`Direct::live_steps`]).
    pub(super) fn get(
        &mut self,
        g: &Direct,
        offsets: &[usize],
        channel: usize,
        key: (Bits, Bits),
    ) -> &[Step] {
        let at = match self.lists.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let steps = g.live_steps(offsets, channel, key.0, key.1);
                self.lists.push((key, steps));
                self.lists.len() - 1
            }
        };
        &self.lists[at].1
    }
}

/// The tiles of one output plane: consecutive chunks `start .. start + len` of the plane's
/// chunks, and the live rows of the kernel for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PlaneTile {
    pub start: usize,
    pub len: usize,
    pub rows: Bits,
}

impl Direct {
    /// Live taps along one axis for an output position `o` of that axis: tap `i` reads padded
    /// position `o + i·dil`, inside when `pad ≤ o + i·dil < pad + size`.
    pub(super) fn live_axis(&self, axis: usize, o: usize) -> Bits {
        let (size, pad, dil) = (
            self.input[axis + 1],
            self.padding[axis],
            self.dilation[axis],
        );
        let mut bits = 0;
        for i in 0..self.kernel[axis] {
            let p = o + i * dil;
            if p >= pad && p < pad + size {
                bits |= 1 << i.min(63);
            }
        }
        bits
    }

    /// Live planes of the kernel for output plane `z`.
    pub(super) fn live_planes(&self, z: usize) -> Bits {
        self.live_axis(0, z)
    }

    /// Live rows of the kernel for the output rows that padded offsets `q0 .. q1` (within a
    /// plane, `q = y·Wp + x`) cover with output voxels.
    fn live_rows(&self, q0: usize, q1: usize) -> Bits {
        let [_, oh, ow] = self.output();
        let [_, _, wp] = self.padded();
        (q0 / wp..=(q1 - 1) / wp)
            .filter(|&y| y < oh && q0.max(y * wp) < q1.min(y * wp + ow))
            .fold(0, |bits, y| bits | self.live_axis(1, y))
    }

    /// The tiles of a plane's chunks (the same for every plane) for a kernel of at most
    /// `max` chunks: runs of equal live rows, a run of one chunk joined to its neighbour,
    /// each run in the fewest tiles with sizes as even as possible.
    pub(super) fn plane_tiles(&self, chunks: &[Chunk], lanes: usize, max: usize) -> Vec<PlaneTile> {
        let mut runs: Vec<PlaneTile> = Vec::new();
        for (i, ch) in chunks.iter().enumerate() {
            let last = 16 - ch.mask.leading_zeros() as usize;
            let span = if ch.mask == 0 { 1 } else { last.min(lanes) };
            let rows = self.live_rows(ch.input, ch.input + span);
            match runs.last_mut() {
                Some(run) if run.rows == rows => run.len += 1,
                _ => runs.push(PlaneTile {
                    start: i,
                    len: 1,
                    rows,
                }),
            }
        }
        let mut joined: Vec<PlaneTile> = Vec::new();
        let mut pending: Option<PlaneTile> = None;
        for mut run in runs {
            if let Some(p) = pending.take() {
                run = PlaneTile {
                    start: p.start,
                    len: p.len + run.len,
                    rows: p.rows | run.rows,
                };
            }
            if run.len == 1 {
                pending = Some(run);
            } else {
                joined.push(run);
            }
        }
        if let Some(p) = pending {
            match joined.last_mut() {
                Some(prev) => {
                    prev.len += p.len;
                    prev.rows |= p.rows;
                }
                None => joined.push(p),
            }
        }
        joined
            .into_iter()
            .flat_map(|run| {
                let tiles = run.len.div_ceil(max.max(1));
                (0..tiles).scan(run.start, move |start, i| {
                    let len = run.len / tiles + usize::from(i < run.len % tiles);
                    let tile = PlaneTile {
                        start: *start,
                        len,
                        rows: run.rows,
                    };
                    *start += len;
                    Some(tile)
                })
            })
            .collect()
    }

    /// The live (c, t) steps for live planes `planes` and rows `rows` of the kernel, with
    /// `offsets[t]` the tap offsets and `channel` the values of one channel of the slab.
    pub(super) fn live_steps(
        &self,
        offsets: &[usize],
        channel: usize,
        planes: Bits,
        rows: Bits,
    ) -> Vec<Step> {
        let live = self.live_taps(planes, rows);
        let t_n = offsets.len();
        (0..self.input[0])
            .flat_map(|c| {
                live.iter().map(move |&t| Step {
                    offset: c * channel + offsets[t],
                    k: c * t_n + t,
                })
            })
            .collect()
    }

    /// The live taps `t = (a·kh + b)·kw + e` of the kernel for live planes and rows.
    pub(super) fn live_taps(&self, planes: Bits, rows: Bits) -> Vec<usize> {
        let [kd, kh, kw] = self.kernel;
        (0..kd * kh * kw)
            .filter(|t| has(planes, t / (kh * kw)) && has(rows, t / kw % kh))
            .collect()
    }

    /// Live planes and rows of the kernel for the output voxels at padded offsets `q0 .. q1`
    /// of a whole sample (`q = z·Hp·Wp + y·Wp + x`).
    pub(super) fn live_in_range(&self, q0: usize, q1: usize) -> (Bits, Bits) {
        let [_, hp, wp] = self.padded();
        let plane = hp * wp;
        let (mut planes, mut rows) = (0, 0);
        self.runs(q0, q1, |q, _, count| {
            let z = q / plane;
            let within = q - z * plane;
            planes |= self.live_planes(z);
            rows |= self.live_rows(within, within + count);
        });
        (planes, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::Backend;

    fn geometry(input: [usize; 4], kernel: usize, padding: usize) -> Direct {
        Direct {
            input,
            kernel: [kernel; 3],
            padding: [padding; 3],
            dilation: [1; 3],
            out_channels: 4,
            samples: 1,
            backend: Backend::Gemm,
        }
    }

    /// 16 rows of 16 voxels, 5³ kernel, padding 2: rows 0 and 1, and 14 and 15, share a tile
    /// each, their outer rows of taps dead; the 12 rows between in tiles of 3 with all taps.
    #[test]
    fn borders_share_tiles_and_skip_their_dead_rows() {
        let g = geometry([1, 16, 16, 16], 5, 2);
        let (chunks, packed) = g.plane_chunks(16, true);
        assert!(!packed);
        let tiles = g.plane_tiles(&chunks, 16, 3);
        let lens: Vec<usize> = tiles.iter().map(|t| t.len).collect();
        assert_eq!(lens, [2, 3, 3, 3, 3, 2]);
        assert_eq!(tiles[0].rows, 0b11110);
        assert!(tiles[1..5].iter().all(|t| t.rows == 0b11111));
        assert_eq!(tiles[5].rows, 0b01111);
        assert_eq!(g.live_planes(0), 0b11100);
        assert_eq!(g.live_planes(7), 0b11111);
        // 3 of 5 planes × 4 of 5 rows × 5 columns
        assert_eq!(g.live_taps(0b11100, 0b11110).len(), 60);
    }

    /// A padding wider than the kernel's reach leaves output rows with no live tap at all.
    #[test]
    fn rows_entirely_in_the_padding_have_no_live_taps() {
        let g = geometry([1, 2, 2, 2], 3, 3);
        assert_eq!(g.output(), [6, 6, 6]);
        assert_eq!(g.live_planes(0), 0);
        assert_eq!(g.live_planes(2), 0b110);
        assert_eq!(g.live_planes(4), 0b001);
        assert!(g.live_taps(g.live_planes(0), 0b111).is_empty());
    }

    /// Tile sizes: the fewest tiles, as even as possible, every chunk in exactly one tile.
    #[test]
    fn tiles_cover_every_chunk_once() {
        for (w, k, p) in [(37, 3, 1), (8, 5, 2), (4, 3, 1), (20, 3, 2)] {
            let g = geometry([1, 9, 11, w], k, p);
            for (lanes, max) in [(16, 3), (8, 2)] {
                let (chunks, _) = g.plane_chunks(lanes, lanes == 16);
                let tiles = g.plane_tiles(&chunks, lanes, max);
                let mut next = 0;
                for t in &tiles {
                    assert_eq!(t.start, next);
                    assert!((1..=max).contains(&t.len));
                    next += t.len;
                }
                assert_eq!(next, chunks.len());
            }
        }
    }
}
