//! Contours of binary masks and contour maps of label volumes (paper §2.1, formulas §1).

use ndarray::{Array, ArrayView, Zip};

use crate::element::{Border, ErosionSpec};
use crate::grid::{Binary, Grid, Label, active_axes, binary_volume};
use crate::uniform::uniform_neighbourhood;
use crate::{MorphologyError, Result};

/// The inner contour of a mask: `C(S) = S ∧ ¬erodeⁿ_B(S)`, a band about `n·(k−1)/2` voxels
/// thick inside the object (paper eq. 1).
pub fn contour<T: Binary, D: Grid>(
    mask: ArrayView<'_, T, D>,
    spec: &ErosionSpec,
) -> Result<Array<bool, D>> {
    spec.validate()?;
    let mask = binary_volume(mask);
    let contour = uniform_neighbourhood(
        mask.view(),
        spec.element,
        spec.iterations,
        spec.border == Border::Background,
        false,
        active_axes::<D>(),
        |uniform, m| m & !uniform,
    );
    Ok(D::from_volume(contour))
}

/// Settings of a multi-class contour map.
///
/// The default is the paper's erosion (cube 3, 6 iterations, background border) over the
/// foreground classes; CWCE uses `include_background = true` (formulas §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContourSpec {
    /// The erosion whose residue is the contour.
    pub erosion: ErosionSpec,
    /// Count class 0 too: the map then holds a band on both sides of every boundary (the
    /// reference code's choice, and CWCE's).
    pub include_background: bool,
}

/// The contour map of a label volume: the union of the per-class contours
/// `C_v = 1` iff `v ∈ C(y = k)` for some counted class `k`, computed for every class in one
/// pass (the contour of class `k` holds only voxels of class `k`, so the union keeps them all).
#[derive(Debug, Clone)]
pub struct ContourMap<'a, L, D: Grid> {
    labels: ArrayView<'a, L, D>,
    union: Array<bool, D>,
    include_background: bool,
}

impl<'a, L: Label, D: Grid> ContourMap<'a, L, D> {
    /// The union map `C` over the counted classes.
    pub fn union(&self) -> &Array<bool, D> {
        &self.union
    }

    /// The union map, owned.
    pub fn into_union(self) -> Array<bool, D> {
        self.union
    }

    /// The contour `C_k = C(y = k)` of one class.
    ///
    /// Errors for the background class when the map was built without it.
    pub fn class(&self, class: L) -> Result<Array<bool, D>> {
        if class.is_background() && !self.include_background {
            return Err(MorphologyError::BackgroundExcluded);
        }
        let mut out = self.union.clone();
        Zip::from(&mut out)
            .and(&self.labels)
            .par_for_each(|c, &l| *c &= l == class);
        Ok(out)
    }
}

/// The contour map of a label volume under `spec` (formulas §1), in one pass over the labels
/// whatever the number of classes: `C_v = 1` iff `v`'s class is counted and the eroding
/// element placed at `v` meets another label (or, with a background border, leaves the array).
///
/// Equal, class by class, to `scipy.ndimage.binary_erosion` of each `y == k`.
pub fn contour_map<'a, L: Label, D: Grid>(
    labels: ArrayView<'a, L, D>,
    spec: &ContourSpec,
) -> Result<ContourMap<'a, L, D>> {
    spec.erosion.validate()?;
    let erosion = spec.erosion;
    let include_background = spec.include_background;
    let union = uniform_neighbourhood(
        D::as_volume(labels.view()),
        erosion.element,
        erosion.iterations,
        erosion.border == Border::Background,
        false,
        active_axes::<D>(),
        move |uniform, l: L| !uniform & (include_background | !l.is_background()),
    );
    Ok(ContourMap {
        labels,
        union: D::from_volume(union),
        include_background,
    })
}
