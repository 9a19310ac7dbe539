//! The one kernel behind erosion, dilation and contours.
//!
//! A voxel's neighbourhood is *uniform* when every voxel of it holds the voxel's own value and,
//! with a breaking border, lies inside the array. Then, for a mask `S` and labels `y`:
//! `erode(S) = S ∧ uniform(S)`, `dilate(S) = S ∨ ¬uniform'(S)` (reflected element, outside
//! ignored), and the contour of class `k` is `(y = k) ∧ ¬uniform(y)`, for every class at once.
//!
//! * Cube: the box of side `n·(k−1)+1` is a product of 1D windows, so uniformity is separable:
//!   one pass per axis keeps, for each voxel, the length of the run of equal (and so far
//!   uniform) values ending there, and a window is uniform iff the run at its end covers it.
//!   O(1) per voxel and axis, whatever `k` and `n`.
//! * Cross: `n` erosions by the cross are one erosion by the L1 ball of radius `n`. A voxel's
//!   ball holds another value iff a *boundary* voxel (one with a face neighbour of another
//!   value, or on a breaking array edge) lies within L1 distance `n − 1`; the L1 distance
//!   transform is two sweeps per axis.

use std::ops::Range;

use ndarray::{Array3, ArrayView3, Axis, Zip};
use rayon::prelude::*;

use crate::element::{Element, Window};

/// `finish(uniform(v), value(v))` for every voxel `v`, where `uniform(v)` is the uniformity of
/// `v`'s neighbourhood under `iterations` repetitions of `element` along the `axes` of the
/// `[z, y, x]` volume. `reflect` uses the reflected element (for dilation); `outside_breaks`
/// makes a neighbourhood that leaves the array non-uniform. `finish` runs inside the last
/// pass, so the result costs no extra sweep.
pub(crate) fn uniform_neighbourhood<T, F>(
    values: ArrayView3<'_, T>,
    element: Element,
    iterations: usize,
    outside_breaks: bool,
    reflect: bool,
    axes: Range<usize>,
    finish: F,
) -> Array3<bool>
where
    T: Copy + PartialEq + Send + Sync,
    F: Fn(bool, T) -> bool + Sync + Copy,
{
    let values = values.as_standard_layout();
    if values.is_empty() {
        return Array3::from_elem(values.raw_dim(), false);
    }
    match element {
        Element::Cube(_) | Element::Cuboid(_) => {
            let mut windows = [Window::POINT; 3];
            for axis in axes {
                let side = match element {
                    Element::Cuboid(sides) => sides[axis],
                    Element::Cube(side) => side,
                    Element::Cross => 1,
                };
                let window = Window::cube(side, iterations);
                windows[axis] = if reflect { window.reflected() } else { window };
            }
            let longest = windows
                .iter()
                .map(|w| w.back + w.forward + 1)
                .max()
                .unwrap_or(1);
            if longest <= u8::MAX as usize {
                uniform_box::<T, F, u8>(values.view(), windows, outside_breaks, finish)
            } else {
                uniform_box::<T, F, u32>(values.view(), windows, outside_breaks, finish)
            }
        }
        // The cross is symmetric: its reflection is itself.
        Element::Cross => {
            let uniform = uniform_cross(values.view(), iterations, outside_breaks, axes);
            let mut out = uniform;
            Zip::from(&mut out)
                .and(&values)
                .par_for_each(|u, &v| *u = finish(*u, v));
            out
        }
    }
}

/// Elements a task of the strided passes covers at least (amortises the scheduling).
const BLOCK: usize = 8192;

/// Run lengths, saturated at the window length (every threshold compared with is at most
/// that, so saturation changes no answer): `u8` keeps 32 lanes per AVX2 instruction.
trait Run: Copy + Ord + Send + Sync {
    const ZERO: Self;
    const ONE: Self;
    fn from_usize(n: usize) -> Self;
    fn succ_saturated(self, cap: Self) -> Self;
}

impl Run for u8 {
    const ZERO: Self = 0;
    const ONE: Self = 1;
    fn from_usize(n: usize) -> Self {
        n.min(u8::MAX as usize) as u8
    }
    #[inline]
    fn succ_saturated(self, cap: Self) -> Self {
        self.saturating_add(1).min(cap)
    }
}

impl Run for u32 {
    const ZERO: Self = 0;
    const ONE: Self = 1;
    fn from_usize(n: usize) -> Self {
        n.min(u32::MAX as usize) as u32
    }
    #[inline]
    fn succ_saturated(self, cap: Self) -> Self {
        self.saturating_add(1).min(cap)
    }
}

/// Separable uniformity of a box: `x` by break points, then `y` and `z` by run lengths.
fn uniform_box<T, F, R>(
    values: ArrayView3<'_, T>,
    windows: [Window; 3],
    outside_breaks: bool,
    finish: F,
) -> Array3<bool>
where
    T: Copy + PartialEq + Send + Sync,
    F: Fn(bool, T) -> bool + Sync + Copy,
    R: Run,
{
    let (_, height, width) = values.dim();
    let last = (0..3).filter(|&a| windows[a] != Window::POINT).min();
    let Some(last) = last else {
        return values.mapv(|v| finish(true, v));
    };
    let identity = |uniform: bool, _: T| uniform;
    let mut uniform: Option<Array3<bool>> = None;

    if windows[2] != Window::POINT {
        let mut out = Array3::from_elem(values.raw_dim(), false);
        let values = standard_slice(&values);
        let rows = out
            .as_slice_mut()
            .expect("a new array is contiguous")
            .par_chunks_mut(width)
            .zip(values.par_chunks(width));
        if last == 2 {
            rows.for_each(|(out, line)| line_pass(line, out, windows[2], outside_breaks, finish));
        } else {
            rows.for_each(|(out, line)| line_pass(line, out, windows[2], outside_breaks, identity));
        }
        uniform = Some(out);
    }

    if windows[1] != Window::POINT {
        // Each `z` slice is a block whose planes are its rows.
        let mut out = Array3::from_elem(values.raw_dim(), false);
        let slice_len = height * width;
        let prev = uniform.as_ref().map(|u| u.as_slice().expect("contiguous"));
        let source = standard_slice(&values);
        out.as_slice_mut()
            .expect("a new array is contiguous")
            .par_chunks_mut(slice_len)
            .enumerate()
            .for_each(|(z, slice)| {
                let block = Block {
                    values: source,
                    prev,
                    base: z * slice_len,
                    stride: width,
                    len: height,
                };
                let planes = slice.chunks_mut(width).collect();
                if last == 1 {
                    block.pass::<R>(planes, windows[1], outside_breaks, finish);
                } else {
                    block.pass::<R>(planes, windows[1], outside_breaks, identity);
                }
            });
        uniform = Some(out);
    }

    if windows[0] != Window::POINT {
        // Blocks of whole rows, every `z`: their planes are `rows × width` contiguous runs.
        let mut out = Array3::from_elem(values.raw_dim(), false);
        let slice_len = height * width;
        let rows = (BLOCK / width).clamp(1, height);
        let block_len = rows * width;
        let mut blocks: Vec<Vec<&mut [bool]>> = Vec::new();
        for slice in out
            .as_slice_mut()
            .expect("a new array is contiguous")
            .chunks_mut(slice_len)
        {
            for (b, plane) in slice.chunks_mut(block_len).enumerate() {
                if b == blocks.len() {
                    blocks.push(Vec::new());
                }
                blocks[b].push(plane);
            }
        }
        let prev = uniform.as_ref().map(|u| u.as_slice().expect("contiguous"));
        let source = standard_slice(&values);
        blocks.into_par_iter().enumerate().for_each(|(b, planes)| {
            let block = Block {
                values: source,
                prev,
                base: b * block_len,
                stride: slice_len,
                len: planes.len(),
            };
            block.pass::<R>(planes, windows[0], outside_breaks, finish);
        });
        uniform = Some(out);
    }

    uniform.expect("the last pass ran")
}

fn standard_slice<'a, T>(values: &'a ArrayView3<'_, T>) -> &'a [T] {
    values
        .as_slice()
        .expect("the kernel runs on standard-layout volumes")
}

/// One contiguous line, no earlier pass: `out[i] = finish(u, line[i])` with `u` = the window
/// `[i − back, i + forward]` holds one value (and lies inside the line when `outside_breaks`).
///
/// A window is non-uniform iff it straddles a change `line[c − 1] ≠ line[c]`, that is iff
/// `i ∈ [c − forward, c + back − 1]`: the line is set, then the few spans around its changes
/// are cleared (a label line changes value a handful of times).
fn line_pass<T: PartialEq + Copy>(
    line: &[T],
    out: &mut [bool],
    window: Window,
    outside_breaks: bool,
    finish: impl Fn(bool, T) -> bool + Copy,
) {
    let (back, forward) = (window.back, window.forward);
    let n = line.len();
    out.fill(true);
    if outside_breaks {
        out[..back.min(n)].fill(false);
        out[n.saturating_sub(forward)..].fill(false);
    }
    const CHUNK: usize = 32;
    let mut start = 1;
    while start < n {
        let end = (start + CHUNK).min(n);
        let changes = line[start..end]
            .iter()
            .zip(&line[start - 1..end - 1])
            .fold(false, |any, (a, b)| any | (a != b));
        if changes {
            for c in start..end {
                if line[c] != line[c - 1] {
                    out[c.saturating_sub(forward)..(c + back).min(n)].fill(false);
                }
            }
        }
        start = end;
    }
    for (o, &v) in out.iter_mut().zip(line) {
        *o = finish(*o, v);
    }
}

/// The planes of one block of a strided pass: plane `p` of the block is
/// `values[base + p·stride ..][..plane_len]`, contiguous, and the pass runs along `p`.
struct Block<'a, T> {
    values: &'a [T],
    prev: Option<&'a [bool]>,
    base: usize,
    stride: usize,
    len: usize,
}

impl<T: PartialEq + Copy> Block<'_, T> {
    fn plane<'s, U>(&self, data: &'s [U], p: usize, plane_len: usize) -> &'s [U] {
        let start = self.base + p * self.stride;
        &data[start..start + plane_len]
    }

    /// Writes `finish(uniform, value)` into `out` (one slice per plane), combining with the
    /// uniformity `prev` of the earlier passes.
    fn pass<R: Run>(
        &self,
        mut out: Vec<&mut [bool]>,
        window: Window,
        outside_breaks: bool,
        finish: impl Fn(bool, T) -> bool + Copy,
    ) {
        let (back, forward, len) = (window.back, window.forward, self.len);
        let Some(plane_len) = out.first().map(|p| p.len()) else {
            return;
        };
        let full = R::from_usize(back + forward + 1);
        let mut run = vec![R::ZERO; plane_len];
        for p in 0..len {
            let here = self.plane(self.values, p, plane_len);
            let ok = self.prev.map(|u| self.plane(u, p, plane_len));
            if p == 0 {
                match ok {
                    Some(ok) => run
                        .iter_mut()
                        .zip(ok)
                        .for_each(|(r, &u)| *r = if u { R::ONE } else { R::ZERO }),
                    None => run.fill(R::ONE),
                }
            } else {
                let before = self.plane(self.values, p - 1, plane_len);
                match ok {
                    Some(ok) => {
                        for (((r, &u), a), b) in run.iter_mut().zip(ok).zip(here).zip(before) {
                            let next = if a == b {
                                r.succ_saturated(full)
                            } else {
                                R::ONE
                            };
                            *r = if u { next } else { R::ZERO };
                        }
                    }
                    None => {
                        for ((r, a), b) in run.iter_mut().zip(here).zip(before) {
                            *r = if a == b {
                                r.succ_saturated(full)
                            } else {
                                R::ONE
                            };
                        }
                    }
                }
            }
            if p >= forward {
                let i = p - forward;
                let need = if i >= back {
                    Some(full)
                } else if outside_breaks {
                    None
                } else {
                    Some(R::from_usize(p + 1))
                };
                finish_plane(
                    out[i],
                    self.plane(self.values, i, plane_len),
                    &run,
                    need,
                    finish,
                );
            }
        }
        // Windows cut by the end of the axis: they end at len − 1.
        let tail = len.saturating_sub(forward);
        for (i, plane) in out.iter_mut().enumerate().skip(tail) {
            let need = if outside_breaks {
                None
            } else {
                Some(R::from_usize(len - i.saturating_sub(back)))
            };
            finish_plane(
                plane,
                self.plane(self.values, i, plane_len),
                &run,
                need,
                finish,
            );
        }
    }
}

/// Plane `i` of a pass from the runs that end at the last voxel of its windows: uniform iff
/// the run covers `need` voxels; `None`: the window leaves the array (non-uniform).
#[inline]
fn finish_plane<T: Copy, R: Run>(
    out: &mut [bool],
    here: &[T],
    run: &[R],
    need: Option<R>,
    finish: impl Fn(bool, T) -> bool + Copy,
) {
    match need {
        Some(need) => {
            for ((o, &r), &v) in out.iter_mut().zip(run).zip(here) {
                *o = finish(r >= need, v);
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(here) {
                *o = finish(false, v);
            }
        }
    }
}

fn uniform_cross<T: Copy + PartialEq + Send + Sync>(
    values: ArrayView3<'_, T>,
    radius: usize,
    outside_breaks: bool,
    axes: Range<usize>,
) -> Array3<bool> {
    let dim = values.dim();
    let shape = [dim.0, dim.1, dim.2];
    let cap = u32::try_from(radius).unwrap_or(u32::MAX);
    // L1 distance (capped at the radius) to the nearest boundary voxel.
    let mut distance = Array3::from_elem(values.raw_dim(), cap);
    Zip::indexed(&mut distance).par_for_each(|(z, y, x), d| {
        let index = [z, y, x];
        let value = values[index];
        let boundary = axes.clone().any(|axis| {
            let mut neighbour = index;
            let low = index[axis] == 0;
            let high = index[axis] + 1 == shape[axis];
            if (low || high) && outside_breaks {
                return true;
            }
            let mut differs = false;
            if !low {
                neighbour[axis] = index[axis] - 1;
                differs |= values[neighbour] != value;
            }
            if !high {
                neighbour[axis] = index[axis] + 1;
                differs |= values[neighbour] != value;
            }
            differs
        });
        if boundary {
            *d = 0;
        }
    });
    for axis in axes {
        Zip::from(distance.lanes_mut(Axis(axis))).par_for_each(|mut lane| {
            for i in 1..lane.len() {
                lane[i] = lane[i].min(lane[i - 1].saturating_add(1));
            }
            for i in (0..lane.len().saturating_sub(1)).rev() {
                lane[i] = lane[i].min(lane[i + 1].saturating_add(1));
            }
        });
    }
    distance.mapv(|d| d >= cap)
}
