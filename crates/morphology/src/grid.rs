//! The array ranks the crate accepts (2D and 3D) and the voxel types it reads.
//!
//! Every algorithm runs on a standard-layout 3D volume indexed `[z, y, x]`; a 2D image is a
//! volume with one slice whose `z` axis is never filtered, so 2D and 3D share one code path.

use ndarray::{Array, Array3, ArrayView, ArrayView3, Axis, Dimension, Ix2, Ix3};

use crate::{MorphologyError, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for ndarray::Ix2 {}
    impl Sealed for ndarray::Ix3 {}
}

/// A rank the crate works on: [`type@Ix2`] (images `[y, x]`) or [`type@Ix3`] (volumes `[z, y, x]`).
pub trait Grid: Dimension + sealed::Sealed {
    /// The number of axes (2 or 3).
    const RANK: usize;
    /// The array as a `[z, y, x]` volume (an image becomes one slice).
    fn as_volume<T>(array: ArrayView<'_, T, Self>) -> ArrayView3<'_, T>;
    /// The inverse of [`Grid::as_volume`] for owned arrays.
    fn from_volume<T>(volume: Array3<T>) -> Array<T, Self>;
}

impl Grid for Ix3 {
    const RANK: usize = 3;
    fn as_volume<T>(array: ArrayView<'_, T, Self>) -> ArrayView3<'_, T> {
        array
    }
    fn from_volume<T>(volume: Array3<T>) -> Array<T, Self> {
        volume
    }
}

impl Grid for Ix2 {
    const RANK: usize = 2;
    fn as_volume<T>(array: ArrayView<'_, T, Self>) -> ArrayView3<'_, T> {
        array.insert_axis(Axis(0))
    }
    fn from_volume<T>(volume: Array3<T>) -> Array<T, Self> {
        volume.index_axis_move(Axis(0), 0)
    }
}

/// A voxel type read as a binary mask: `true` or non-zero is foreground.
pub trait Binary: Copy + Send + Sync {
    /// Whether the voxel is foreground.
    fn is_set(self) -> bool;
}

impl Binary for bool {
    #[inline]
    fn is_set(self) -> bool {
        self
    }
}

/// A voxel type read as a class label: 0 is the background class.
pub trait Label: Copy + PartialEq + Send + Sync {
    /// Whether the voxel is background (label 0).
    fn is_background(self) -> bool;
    /// The label as a wide integer, for class indexing and error messages.
    fn to_i128(self) -> i128;
}

macro_rules! integer_voxels {
    ($($t:ty),*) => {$(
        impl Binary for $t {
            #[inline]
            fn is_set(self) -> bool {
                self != 0
            }
        }
        impl Label for $t {
            #[inline]
            fn is_background(self) -> bool {
                self == 0
            }
            #[inline]
            fn to_i128(self) -> i128 {
                self as i128
            }
        }
    )*};
}
integer_voxels!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Label for bool {
    #[inline]
    fn is_background(self) -> bool {
        !self
    }
    #[inline]
    fn to_i128(self) -> i128 {
        self as i128
    }
}

/// The mask as a standard-layout boolean volume.
pub(crate) fn binary_volume<T: Binary, D: Grid>(mask: ArrayView<'_, T, D>) -> Array3<bool> {
    D::as_volume(mask).map(|v| v.is_set())
}

/// Physical spacing per axis of the `[z, y, x]` volume; a 2D image gets a unit `z` spacing
/// that no algorithm reads. `None` means unit spacing.
pub(crate) fn volume_spacing<D: Grid>(spacing: Option<&[f64]>) -> Result<[f64; 3]> {
    let Some(spacing) = spacing else {
        return Ok([1.0; 3]);
    };
    if spacing.len() != D::RANK {
        return Err(MorphologyError::SpacingRank {
            expected: D::RANK,
            got: spacing.len(),
        });
    }
    if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(MorphologyError::Spacing(spacing.to_vec()));
    }
    let mut out = [1.0; 3];
    out[3 - D::RANK..].copy_from_slice(spacing);
    Ok(out)
}

/// The axes of the `[z, y, x]` volume that the algorithms filter: all three for a volume,
/// `y` and `x` for an image.
pub(crate) fn active_axes<D: Grid>() -> std::ops::Range<usize> {
    3 - D::RANK..3
}
