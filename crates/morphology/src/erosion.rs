//! Binary erosion and dilation.

use ndarray::{Array, ArrayView};

use crate::Result;
use crate::element::{Border, ErosionSpec};
use crate::grid::{Binary, Grid, active_axes, binary_volume};
use crate::uniform::uniform_neighbourhood;

/// Binary erosion: `erode(S)(v) = 1` iff every voxel of the element placed at `v` is in `S`,
/// repeated `spec.iterations` times.
///
/// Bit-identical to `scipy.ndimage.binary_erosion(S, structure, iterations=n)` with
/// `structure = np.ones((k,) * ndim)` (any `k`, origin `k // 2`) or
/// `generate_binary_structure(ndim, 1)`, for [`Border::Background`]; [`Border::Replicate`]
/// matches `scipy.ndimage.minimum_filter(S, size=k, mode="nearest")` applied `n` times.
/// A cube costs O(1) per voxel whatever `k` and `n`.
pub fn erode<T: Binary, D: Grid>(
    mask: ArrayView<'_, T, D>,
    spec: &ErosionSpec,
) -> Result<Array<bool, D>> {
    spec.validate()?;
    let mask = binary_volume(mask);
    let eroded = uniform_neighbourhood(
        mask.view(),
        spec.element,
        spec.iterations,
        spec.border == Border::Background,
        false,
        active_axes::<D>(),
        |uniform, m| m & uniform,
    );
    Ok(D::from_volume(eroded))
}

/// Binary dilation: `dilate(S)(v) = 1` iff the reflected element placed at `v` meets `S`,
/// repeated `spec.iterations` times. Outside the array never adds foreground, so both
/// borders give the same result.
///
/// Bit-identical to `scipy.ndimage.binary_dilation(S, structure, iterations=n)` (which
/// reflects even cubes, so `k = 2` grows towards higher indices).
pub fn dilate<T: Binary, D: Grid>(
    mask: ArrayView<'_, T, D>,
    spec: &ErosionSpec,
) -> Result<Array<bool, D>> {
    spec.validate()?;
    let mask = binary_volume(mask);
    let dilated = uniform_neighbourhood(
        mask.view(),
        spec.element,
        spec.iterations,
        false,
        true,
        active_axes::<D>(),
        |uniform, m| m | !uniform,
    );
    Ok(D::from_volume(dilated))
}
