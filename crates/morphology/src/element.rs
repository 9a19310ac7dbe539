//! Structuring elements, borders and the erosion settings shared by every operation.

use crate::{MorphologyError, Result};

/// The structuring element of an erosion or dilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// A full cube (square in 2D) of the given side `k ≥ 1`: 26-neighbourhood for `k = 3`.
    /// Even sides erode asymmetrically with the origin at index `k / 2`, as
    /// `scipy.ndimage.binary_erosion(mask, np.ones((k,) * ndim))` does.
    Cube(usize),
    /// A box of sides `[s_z, s_y, s_x]` (each ≥ 1; a 2D array uses `s_y, s_x`), as
    /// `scipy.ndimage.binary_erosion(mask, np.ones((s_z, s_y, s_x)))`: a contour band of
    /// `n_a` voxels along axis `a` on anisotropic grids is one erosion by the box of sides
    /// `2 n_a + 1` (what `n_a` erosions of a 3-cube give along that axis). Even sides erode
    /// asymmetrically, the origin at index `s / 2`, as [`Element::Cube`].
    Cuboid([usize; 3]),
    /// The cross of the face neighbours (6-neighbourhood in 3D, 4 in 2D), scipy's
    /// `generate_binary_structure(ndim, 1)`.
    Cross,
}

/// What lies outside the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Border {
    /// Outside counts as background (scipy's `border_value = 0`): foreground touching the edge
    /// of the array erodes away there and becomes contour.
    #[default]
    Background,
    /// Outside copies the nearest voxel: the edge of a crop is never contour.
    Replicate,
}

/// Settings of an erosion or dilation: `iterations` repetitions with `element`.
///
/// The default is the paper's: a 3×3×3 cube, 6 iterations, background border.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErosionSpec {
    /// The structuring element.
    pub element: Element,
    /// How many times the element is applied (`n ≥ 1`).
    pub iterations: usize,
    /// What lies outside the array.
    pub border: Border,
}

impl Default for ErosionSpec {
    fn default() -> Self {
        Self {
            element: Element::Cube(3),
            iterations: 6,
            border: Border::Background,
        }
    }
}

impl ErosionSpec {
    /// The paper's settings: cube of side 3, 6 iterations, background border.
    pub fn paper() -> Self {
        Self::default()
    }

    /// How far along any axis the result at a voxel depends on its neighbours: `n·⌊k/2⌋`
    /// voxels for `n` erosions by a cube of side `k` (the longer side of an even cube's
    /// window), `n` for the cross. A crop widened by this halo on every side (and clipped at
    /// the array's edges, where the border rule then applies as it does for the whole array)
    /// has, inside the original crop, exactly the whole array's erosion, contour or contour map.
    pub fn reach(&self) -> usize {
        match self.element {
            Element::Cube(k) => self.iterations * (k / 2),
            Element::Cuboid(sides) => {
                self.iterations * (sides.iter().max().copied().unwrap_or(1) / 2)
            }
            Element::Cross => self.iterations,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match self.element {
            Element::Cube(0) => return Err(MorphologyError::CubeSide(0)),
            Element::Cuboid(sides) if sides.contains(&0) => {
                return Err(MorphologyError::CubeSide(0));
            }
            _ => {}
        }
        if self.iterations == 0 {
            return Err(MorphologyError::ZeroIterations);
        }
        Ok(())
    }
}

/// The offsets `[-back, +forward]` a voxel sees along one axis, for a cube erosion repeated
/// `iterations` times: `n` erosions by a side-`k` cube are one erosion by a side
/// `n·(k−1)+1` cube whose origin sits `n·(k/2)` voxels from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub back: usize,
    pub forward: usize,
}

impl Window {
    pub const POINT: Window = Window {
        back: 0,
        forward: 0,
    };

    pub fn cube(side: usize, iterations: usize) -> Self {
        Window {
            back: iterations * (side / 2),
            forward: iterations * (side - 1 - side / 2),
        }
    }

    /// The window of the reflected element (dilation is erosion of the complement by it).
    pub fn reflected(self) -> Self {
        Window {
            back: self.forward,
            forward: self.back,
        }
    }
}
