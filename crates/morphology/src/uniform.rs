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

use ndarray::{Array3, ArrayView3, ArrayViewMut3, Axis, Zip, s};
use rayon::prelude::*;

use crate::element::{Element, Window};

/// Uniformity of every voxel's neighbourhood under `iterations` repetitions of `element`
/// along the `axes` of the `[z, y, x]` volume. `reflect` uses the reflected element (for
/// dilation); `outside_breaks` makes a neighbourhood that leaves the array non-uniform.
pub(crate) fn uniform_neighbourhood<T: Copy + PartialEq + Send + Sync>(
    values: ArrayView3<'_, T>,
    element: Element,
    iterations: usize,
    outside_breaks: bool,
    reflect: bool,
    axes: Range<usize>,
) -> Array3<bool> {
    if values.is_empty() {
        return Array3::from_elem(values.raw_dim(), true);
    }
    let values = values.as_standard_layout();
    match element {
        Element::Cube(side) => {
            let mut windows = [Window::POINT; 3];
            for axis in axes {
                let window = Window::cube(side, iterations);
                windows[axis] = if reflect { window.reflected() } else { window };
            }
            uniform_box(values.view(), windows, outside_breaks)
        }
        // The cross is symmetric: its reflection is itself.
        Element::Cross => uniform_cross(values.view(), iterations, outside_breaks, axes),
    }
}

/// Elements a task of the strided passes covers at least (amortises the scheduling).
const BLOCK: usize = 8192;

fn uniform_box<T: Copy + PartialEq + Send + Sync>(
    values: ArrayView3<'_, T>,
    windows: [Window; 3],
    outside_breaks: bool,
) -> Array3<bool> {
    let (_, height, width) = values.dim();
    let mut uniform: Option<Array3<bool>> = None;

    if windows[2] != Window::POINT {
        let mut out = Array3::from_elem(values.raw_dim(), false);
        let values = standard_slice(&values);
        out.as_slice_mut()
            .expect("a new array is contiguous")
            .par_chunks_mut(width)
            .zip(values.par_chunks(width))
            .for_each(|(out, line)| line_pass(line, out, windows[2], outside_breaks));
        uniform = Some(out);
    }

    if windows[1] != Window::POINT {
        let mut out = Array3::from_elem(values.raw_dim(), false);
        let slices: Vec<_> = out.axis_iter_mut(Axis(0)).collect();
        slices.into_par_iter().enumerate().for_each(|(z, slice)| {
            let prev = uniform
                .as_ref()
                .map(|u| u.index_axis(Axis(0), z).insert_axis(Axis(1)));
            block_pass(
                values.index_axis(Axis(0), z).insert_axis(Axis(1)),
                prev,
                slice.insert_axis(Axis(1)),
                windows[1],
                outside_breaks,
            );
        });
        uniform = Some(out);
    }

    if windows[0] != Window::POINT {
        let mut out = Array3::from_elem(values.raw_dim(), false);
        let rows = (BLOCK / width.max(1)).clamp(1, height.max(1));
        let blocks: Vec<_> = out.axis_chunks_iter_mut(Axis(1), rows).collect();
        blocks.into_par_iter().enumerate().for_each(|(b, block)| {
            let y = b * rows..b * rows + block.dim().1;
            let prev = uniform.as_ref().map(|u| u.slice(s![.., y.clone(), ..]));
            block_pass(
                values.slice(s![.., y, ..]),
                prev,
                block,
                windows[0],
                outside_breaks,
            );
        });
        uniform = Some(out);
    }

    uniform.unwrap_or_else(|| Array3::from_elem(values.raw_dim(), true))
}

fn standard_slice<'a, T>(values: &'a ArrayView3<'_, T>) -> &'a [T] {
    values
        .as_slice()
        .expect("the kernel runs on standard-layout volumes")
}

/// One contiguous line, no earlier pass: `out[i]` = the window `[i − back, i + forward]` holds
/// one value (and lies inside the line when `outside_breaks`).
fn line_pass<T: PartialEq>(line: &[T], out: &mut [bool], window: Window, outside_breaks: bool) {
    let (back, forward) = (window.back, window.forward);
    let n = line.len();
    let full = back + forward + 1;
    let mut run = 0usize;
    for p in 0..n {
        run = if p > 0 && line[p] == line[p - 1] {
            run + 1
        } else {
            1
        };
        if p >= forward {
            let i = p - forward;
            out[i] = if i >= back {
                run >= full
            } else {
                !outside_breaks && run > p
            };
        }
    }
    if !outside_breaks {
        // Windows cut by the end of the line: they end at n − 1.
        for (i, out) in out.iter_mut().enumerate().skip(n.saturating_sub(forward)) {
            *out = run >= n - i.saturating_sub(back);
        }
    }
}

/// The pass along axis 0 of a block whose planes `[.., ..]` at fixed axis-0 index are
/// contiguous, combining with the uniformity `prev` of the earlier passes.
fn block_pass<T: PartialEq>(
    values: ArrayView3<'_, T>,
    prev: Option<ArrayView3<'_, bool>>,
    mut out: ArrayViewMut3<'_, bool>,
    window: Window,
    outside_breaks: bool,
) {
    let (back, forward) = (window.back, window.forward);
    let len = values.dim().0;
    let plane_len = values.dim().1 * values.dim().2;
    let full = (back + forward + 1) as u32;
    let mut run = vec![0u32; plane_len];
    let contiguous = "planes of a standard-layout block are contiguous";
    let write = |out: &mut ArrayViewMut3<'_, bool>, i: usize, run: &[u32], need: u32| {
        let mut plane = out.index_axis_mut(Axis(0), i);
        let plane = plane.as_slice_mut().expect(contiguous);
        for (o, &r) in plane.iter_mut().zip(run) {
            *o = r >= need;
        }
    };
    for p in 0..len {
        let here = values.index_axis(Axis(0), p);
        let here = here.as_slice().expect(contiguous);
        let prev_plane = prev.as_ref().map(|u| u.index_axis(Axis(0), p));
        let ok = prev_plane.as_ref().map(|u| u.as_slice().expect(contiguous));
        if p == 0 {
            match ok {
                Some(ok) => run.iter_mut().zip(ok).for_each(|(r, &u)| *r = u as u32),
                None => run.fill(1),
            }
        } else {
            let before = values.index_axis(Axis(0), p - 1);
            let before = before.as_slice().expect(contiguous);
            match ok {
                Some(ok) => {
                    for (((r, &u), a), b) in run.iter_mut().zip(ok).zip(here).zip(before) {
                        *r = if !u {
                            0
                        } else if a == b {
                            *r + 1
                        } else {
                            1
                        };
                    }
                }
                None => {
                    for ((r, a), b) in run.iter_mut().zip(here).zip(before) {
                        *r = if a == b { *r + 1 } else { 1 };
                    }
                }
            }
        }
        if p >= forward {
            let i = p - forward;
            if i >= back {
                write(&mut out, i, &run, full);
            } else if !outside_breaks {
                write(&mut out, i, &run, (p + 1) as u32);
            }
        }
    }
    if !outside_breaks {
        for i in len.saturating_sub(forward)..len {
            write(&mut out, i, &run, (len - i.saturating_sub(back)) as u32);
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
