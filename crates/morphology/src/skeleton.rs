//! 3-D skeletons by thinning (Lee, Kashyap & Chu 1994), voxel for voxel those of
//! `skimage.morphology.skeletonize` on 3-D input (scikit-image 0.26), and the tubed skeleton
//! of Skeleton Recall (Kirchhoff et al. 2024).
//!
//! **Thinning.** The volume is padded by one background voxel on every side. Each voxel `v`
//! has the 27 voxels of its 3×3×3 neighbourhood, numbered `i = 9 (dz + 1) + 3 (dx + 1) + (dy + 1)`
//! for offsets `dz, dy, dx ∈ {−1, 0, 1}` along `[z, y, x]` (13 is `v` itself). A foreground
//! voxel is *deletable* when
//! 1. it is not an end point: exactly one of its 26 neighbours is foreground makes it one;
//! 2. deleting it keeps the Euler characteristic (26-connectivity): over the 8 octants (the
//!    2×2×2 blocks holding `v`) the sum of Lee's Table 2 column `δG₂₆`, indexed by the octant's 7
//!    other voxels, is 0;
//! 3. it is simple: its 26 neighbours form at most one 26-connected component.
//!
//! One sweep visits six border directions in the order −y, +y, +x, −x, +z, −z (only the first
//! four, the in-plane ones, when the volume has a single slice). For a direction, the
//! *candidates* are the deletable foreground voxels whose neighbour in that direction is
//! background, collected in raster order (`z`, then `y`, then `x`) on the image as it stands;
//! then each candidate, in that order, is checked again on the image as deletions so far left
//! it, for condition 3 only (simple), and deleted if it still is. Sweeps repeat until a whole
//! sweep deletes nothing in any direction.
//!
//! The re-check is scikit-image's: it does not repeat conditions 1 and 2, so a voxel whose
//! neighbours were all deleted before it (no neighbour left: simple) goes too, and a small
//! convex object can vanish entirely (a solid 4×4×4 cube does, as in scikit-image).
//!
//! **Tubed skeleton.** Skeleton Recall's target: the skeleton `S` of the union of the
//! foreground classes (`y > 0`), dilated twice by the face cross (the 6-neighbourhood; together
//! the L1 ball of radius 2), and multiplied by the labels: `s(v) = y(v) · [v ∈ dilate²(S)]`, so
//! each tube voxel inside the foreground carries its own class and voxels outside the
//! foreground are 0.

use ndarray::{Array3, ArrayView3, Zip};

use crate::Result;
use crate::element::{Border, Element, ErosionSpec};
use crate::erosion::dilate;
use crate::grid::{Binary, Label};

/// Lee et al. (1994) Table 2, column `δG₂₆`: the change of the Euler characteristic an octant
/// contributes, for the octant code `n` (odd: bit 0 is the centre) at index `n >> 1`.
const EULER_CHANGE: [i8; 128] = [
    1, -1, -1, 1, -3, -1, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
    -3, -1, 3, 1, 1, -1, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
    -3, 3, -1, 1, 1, 3, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
    1, 3, 3, 1, 5, 3, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
    -7, -1, -1, 1, -3, -1, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
    -3, -1, 3, 1, 1, -1, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
    -3, 3, -1, 1, 1, 3, -1, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
    1, 3, 3, 1, 5, 3, 3, 1, -1, 1, 1, -1, 3, 1, 1, -1, //
];

/// The 7 neighbours of each octant other than the centre, most significant code bit first
/// (bit `7 − j` for the `j`-th), in Lee's octant order and reading.
const OCTANTS: [[usize; 7]; 8] = [
    [2, 1, 11, 10, 5, 4, 14],
    [0, 9, 3, 12, 1, 10, 4],
    [8, 7, 17, 16, 5, 4, 14],
    [6, 15, 7, 16, 3, 12, 4],
    [20, 23, 19, 22, 11, 14, 10],
    [18, 21, 9, 12, 19, 22, 10],
    [26, 23, 17, 14, 25, 22, 16],
    [24, 25, 15, 16, 21, 22, 12],
];

/// The centre's number in the 27-neighbourhood.
const CENTRE: usize = 13;

/// The border directions in sweep order, as `[dz, dy, dx]` offsets of the neighbour that must
/// be background: −y, +y, +x, −x, +z, −z.
const BORDERS: [[isize; 3]; 6] = [
    [0, -1, 0],
    [0, 1, 0],
    [0, 0, 1],
    [0, 0, -1],
    [1, 0, 0],
    [-1, 0, 0],
];

/// The offsets `[dz, dy, dx]` of neighbour `i`.
const fn offset(i: usize) -> [isize; 3] {
    [
        (i / 9) as isize - 1,
        (i % 3) as isize - 1,
        ((i / 3) % 3) as isize - 1,
    ]
}

/// For each neighbour `i`, the bit set of the other neighbours (centre excluded) it touches
/// under 26-connectivity.
const ADJACENT: [u32; 27] = {
    let mut table = [0u32; 27];
    let mut i = 0;
    while i < 27 {
        let a = offset(i);
        let mut j = 0;
        while j < 27 {
            let b = offset(j);
            let touching =
                (a[0] - b[0]).abs() <= 1 && (a[1] - b[1]).abs() <= 1 && (a[2] - b[2]).abs() <= 1;
            if touching && i != j && i != CENTRE && j != CENTRE {
                table[i] |= 1 << j;
            }
            j += 1;
        }
        i += 1;
    }
    table
};

/// Whether a voxel with the 27-neighbourhood bit set `nb` (bit `i` = neighbour `i` is
/// foreground) may be deleted: not an end point, Euler invariant and simple.
fn deletable(nb: u32) -> bool {
    nb.count_ones() != 2 && euler_invariant(nb) && simple(nb)
}

/// `Σ_octants δG₂₆(code) = 0`, the octant's code being `1 + Σ_j 2^{7−j} [neighbour j set]`.
fn euler_invariant(nb: u32) -> bool {
    let change: i32 = OCTANTS
        .iter()
        .map(|octant| {
            let code = octant.iter().enumerate().fold(1usize, |code, (j, &i)| {
                code | ((((nb >> i) & 1) as usize) << (7 - j))
            });
            i32::from(EULER_CHANGE[code >> 1])
        })
        .sum();
    change == 0
}

/// At most one 26-connected component among the 26 neighbours (the centre left out).
fn simple(nb: u32) -> bool {
    let rest = nb & !(1 << CENTRE);
    if rest == 0 {
        return true;
    }
    let mut component = rest & rest.wrapping_neg();
    let mut frontier = component;
    while frontier != 0 {
        let mut grown = 0;
        let mut bits = frontier;
        while bits != 0 {
            grown |= ADJACENT[bits.trailing_zeros() as usize];
            bits &= bits - 1;
        }
        frontier = grown & rest & !component;
        component |= frontier;
    }
    component == rest
}

/// A zero-padded copy of the mask as a flat `u8` array, with the flat offsets of the
/// 27-neighbourhood.
struct Padded {
    voxels: Vec<u8>,
    shape: [usize; 3],
    neighbours: [isize; 27],
}

impl Padded {
    fn new<T: Binary>(mask: ArrayView3<'_, T>) -> Self {
        let (d, h, w) = mask.dim();
        let shape = [d + 2, h + 2, w + 2];
        let mut voxels = vec![0u8; shape.iter().product()];
        for ((z, y, x), &v) in mask.indexed_iter() {
            voxels[((z + 1) * shape[1] + y + 1) * shape[2] + x + 1] = u8::from(v.is_set());
        }
        let neighbours = std::array::from_fn(|i| Self::flat(shape, offset(i)));
        Padded {
            voxels,
            shape,
            neighbours,
        }
    }

    fn flat(shape: [usize; 3], [dz, dy, dx]: [isize; 3]) -> isize {
        (dz * shape[1] as isize + dy) * shape[2] as isize + dx
    }

    /// The 27-neighbourhood bit set of the voxel at flat index `at` (never on the padding).
    fn neighbourhood(&self, at: usize) -> u32 {
        self.neighbours
            .iter()
            .enumerate()
            .fold(0u32, |nb, (i, &o)| {
                nb | (u32::from(self.voxels[at.wrapping_add_signed(o)]) << i)
            })
    }

    /// The foreground voxels' flat indices in raster order.
    fn foreground(&self) -> Vec<usize> {
        (0..self.voxels.len())
            .filter(|&i| self.voxels[i] != 0)
            .collect()
    }

    /// One border direction's candidate collection and sequential re-check (simple points
    /// only); whether any voxel was deleted.
    fn thin_border(&mut self, foreground: &[usize], border: [isize; 3]) -> bool {
        let step = Self::flat(self.shape, border);
        let candidates: Vec<usize> = foreground
            .iter()
            .copied()
            .filter(|&i| self.voxels[i.wrapping_add_signed(step)] == 0)
            .filter(|&i| deletable(self.neighbourhood(i)))
            .collect();
        let mut changed = false;
        for i in candidates {
            if simple(self.neighbourhood(i)) {
                self.voxels[i] = 0;
                changed = true;
            }
        }
        changed
    }
}

/// The skeleton of a binary volume `[z, y, x]` by Lee et al.'s 3-D thinning (module docs):
/// equal, voxel for voxel, to `skimage.morphology.skeletonize` of the same 3-D array
/// (scikit-image 0.26). A volume of one slice is thinned in the four in-plane directions
/// only, as scikit-image does for such an array (its 2-D default, Zhang's method, differs).
/// Single-threaded; each sweep visits only the remaining foreground.
pub fn skeletonize<T: Binary>(mask: ArrayView3<'_, T>) -> Array3<bool> {
    let (d, h, w) = mask.dim();
    let mut padded = Padded::new(mask);
    let borders = if d == 1 { &BORDERS[..4] } else { &BORDERS[..] };
    let mut foreground = padded.foreground();
    let mut unchanged = 0;
    while unchanged < borders.len() {
        unchanged = 0;
        for &border in borders {
            if padded.thin_border(&foreground, border) {
                foreground.retain(|&i| padded.voxels[i] != 0);
            } else {
                unchanged += 1;
            }
        }
    }
    let [_, ph, pw] = padded.shape;
    Array3::from_shape_fn((d, h, w), |(z, y, x)| {
        padded.voxels[((z + 1) * ph + y + 1) * pw + x + 1] != 0
    })
}

/// Skeleton Recall's tubed skeleton of a label volume `[z, y, x]` (module docs):
/// `s = y · [dilate²_cross(skeletonize(y > 0))]`, background (`T::default()`, 0) elsewhere,
/// as the reference's `SkeletonTransform(do_tube=True)` on one sample. The skeleton is of the
/// union of every foreground class, not of each class alone; each tube voxel keeps the class
/// the labels give it.
pub fn tubed_skeleton<T: Label + Default>(labels: ArrayView3<'_, T>) -> Result<Array3<T>> {
    let foreground = labels.mapv(|l| !l.is_background());
    let mut out = Array3::from_elem(labels.dim(), T::default());
    if !foreground.iter().any(|&f| f) {
        return Ok(out);
    }
    let skeleton = skeletonize(foreground.view());
    let tube = dilate(
        skeleton.view(),
        &ErosionSpec {
            element: Element::Cross,
            iterations: 2,
            border: Border::Background,
        },
    )?;
    Zip::from(&mut out)
        .and(&tube)
        .and(&labels)
        .for_each(|o, &t, &l| {
            if t {
                *o = l;
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_numbering_matches_the_offsets() {
        // 10 = (0, 0, −1) in [z, y, x], 12 = (0, −1, 0), 4 = (−1, 0, 0)
        assert_eq!(offset(10), [0, 0, -1]);
        assert_eq!(offset(12), [0, -1, 0]);
        assert_eq!(offset(4), [-1, 0, 0]);
        assert_eq!(offset(CENTRE), [0, 0, 0]);
    }

    #[test]
    fn a_lone_voxel_stays_and_a_bar_keeps_a_line() {
        let mut bar = Array3::<u8>::zeros((5, 5, 9));
        bar.slice_mut(ndarray::s![1..4, 1..4, 1..8]).fill(1);
        let skeleton = skeletonize(bar.view());
        let kept = skeleton.iter().filter(|&&s| s).count();
        assert!((1..=7).contains(&kept), "{kept} voxels kept");
        assert!(skeleton[[2, 2, 4]], "the bar's centre");
        let mut lone = Array3::<u8>::zeros((3, 3, 3));
        lone[[1, 1, 1]] = 1;
        assert_eq!(skeletonize(lone.view()), lone.mapv(|v| v != 0));
    }
}
