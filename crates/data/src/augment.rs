//! Seeded spatial and intensity augmentation of an image and its labels together (image by
//! trilinear interpolation, labels by nearest neighbour).

use ndarray::{Array3, Array4, Axis};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::resample::{IndexMap, Interpolation, sample};

/// Which augmentations are drawn, and how often. The default is the paper's (formulas §6):
/// rotation in the axial plane by an angle uniform in `[0°, 15°]` with a random sign,
/// probability 0.2; a horizontal or vertical flip, probability 0.2; nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Probability of a rotation.
    pub rotation_probability: f64,
    /// Largest rotation angle, degrees.
    pub max_rotation_degrees: f64,
    /// Probability of a flip (x or y, equally likely).
    pub flip_probability: f64,
    /// Probability of an isotropic in-plane zoom.
    pub scale_probability: f64,
    /// Zoom factor range.
    pub scale_range: [f64; 2],
    /// Probability of an intensity change `x (1 + a) + b` per channel.
    pub intensity_probability: f64,
    /// `a` is uniform in `±intensity_scale`.
    pub intensity_scale: f64,
    /// `b` is uniform in `±intensity_shift` (in normalised units).
    pub intensity_shift: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            rotation_probability: 0.2,
            max_rotation_degrees: 15.0,
            flip_probability: 0.2,
            scale_probability: 0.0,
            scale_range: [0.85, 1.25],
            intensity_probability: 0.0,
            intensity_scale: 0.1,
            intensity_shift: 0.1,
        }
    }
}

impl AugmentConfig {
    /// No augmentation.
    pub fn none() -> Self {
        AugmentConfig {
            rotation_probability: 0.0,
            flip_probability: 0.0,
            ..AugmentConfig::default()
        }
    }

    /// The paper's augmentation plus nnU-Net-style zoom and intensity changes (probability 0.2
    /// each).
    pub fn extended() -> Self {
        AugmentConfig {
            scale_probability: 0.2,
            intensity_probability: 0.2,
            ..AugmentConfig::default()
        }
    }
}

/// The random choices of one augmentation, drawn all at once before any is applied (so the
/// draws, and thus a seeded run, do not depend on the array sizes).
#[derive(Debug, Clone, PartialEq)]
pub struct Augmentation {
    /// In-plane rotation angle, radians (0: none).
    pub angle: f64,
    /// In-plane zoom factor (1: none).
    pub zoom: f64,
    /// The label array's axis that is reversed (1 = y, 2 = x), if any.
    pub flip: Option<usize>,
    /// Per-channel intensity change `x (1 + a) + b` as `(1 + a, b)`, if drawn.
    pub intensity: Option<Vec<(f64, f64)>>,
}

impl Augmentation {
    /// No change.
    pub fn identity() -> Self {
        Augmentation {
            angle: 0.0,
            zoom: 1.0,
            flip: None,
            intensity: None,
        }
    }

    /// Draws the augmentation of an image of `channels` channels from `rng`.
    pub fn draw<R: Rng>(config: &AugmentConfig, channels: usize, rng: &mut R) -> Self {
        let mut angle = 0.0f64;
        if rng.random_bool(config.rotation_probability.clamp(0.0, 1.0)) {
            angle = rng
                .random_range(0.0..=config.max_rotation_degrees.max(0.0))
                .to_radians();
            if rng.random_bool(0.5) {
                angle = -angle;
            }
        }
        let mut zoom = 1.0f64;
        if rng.random_bool(config.scale_probability.clamp(0.0, 1.0)) {
            let [lo, hi] = config.scale_range;
            zoom = if hi > lo {
                rng.random_range(lo..hi)
            } else {
                lo
            };
        }
        let mut flip = None;
        if rng.random_bool(config.flip_probability.clamp(0.0, 1.0)) {
            flip = Some(if rng.random_bool(0.5) { 2 } else { 1 });
        }
        let mut intensity = None;
        if rng.random_bool(config.intensity_probability.clamp(0.0, 1.0)) {
            let draws = (0..channels)
                .map(|_| {
                    let a = 1.0 + rng.random_range(-1.0..=1.0) * config.intensity_scale;
                    let b = rng.random_range(-1.0..=1.0) * config.intensity_shift;
                    (a, b)
                })
                .collect();
            intensity = Some(draws);
        }
        Augmentation {
            angle,
            zoom,
            flip,
            intensity,
        }
    }

    /// Whether the rotation or zoom moves voxels.
    pub fn resamples(&self) -> bool {
        self.angle != 0.0 || self.zoom != 1.0
    }

    /// Applies the augmentation to `image` `[c, z, y, x]`, `label` `[z, y, x]` and the `maps`
    /// that travel with the labels (nearest neighbour, like the labels), rotating and zooming
    /// about `centre` = `(y, x)` in array coordinates.
    pub fn apply(
        &self,
        image: &mut Array4<f32>,
        label: &mut Array3<u8>,
        maps: &mut [&mut Array3<f32>],
        centre: [f64; 2],
    ) {
        if self.resamples() {
            let map = in_plane_map_about(centre, self.angle, self.zoom);
            let shape = [label.dim().0, label.dim().1, label.dim().2];
            *label = sample(label.view(), shape, &map, Interpolation::Nearest);
            for m in maps.iter_mut() {
                **m = sample(m.view(), shape, &map, Interpolation::Nearest);
            }
            for mut channel in image.axis_iter_mut(Axis(0)) {
                let rotated = sample(channel.view(), shape, &map, Interpolation::Linear);
                channel.assign(&rotated);
            }
        }
        if let Some(axis) = self.flip {
            label.invert_axis(Axis(axis));
            image.invert_axis(Axis(axis + 1));
            *label = label.as_standard_layout().into_owned();
            *image = image.as_standard_layout().into_owned();
            for m in maps.iter_mut() {
                m.invert_axis(Axis(axis));
                **m = m.as_standard_layout().into_owned();
            }
        }
        if let Some(draws) = &self.intensity {
            for (mut channel, &(a, b)) in image.axis_iter_mut(Axis(0)).zip(draws) {
                channel.mapv_inplace(|v| (v as f64 * a + b) as f32);
            }
        }
    }
}

/// Augments `image` `[c, z, y, x]` and `label` `[z, y, x]` in place with draws from `rng`,
/// rotating about the centre of the array.
pub fn augment<R: Rng>(
    image: &mut Array4<f32>,
    label: &mut Array3<u8>,
    config: &AugmentConfig,
    rng: &mut R,
) {
    let augmentation = Augmentation::draw(config, image.dim().0, rng);
    let (_, _, ny, nx) = image.dim();
    let centre = [(ny as f64 - 1.0) / 2.0, (nx as f64 - 1.0) / 2.0];
    augmentation.apply(image, label, &mut [], centre);
}

/// The index map of a rotation by `angle` (radians, the direction of
/// `scipy.ndimage.rotate(..., axes=(1, 2))`) and zoom about the centre of each axial (y, x)
/// plane: output voxel `o` samples input `c + R (o − c) / zoom` with
/// `R = [[cos, sin], [−sin, cos]]` on `(y, x)`.
pub fn in_plane_map(shape: (usize, usize, usize), angle: f64, zoom: f64) -> IndexMap {
    let centre = [(shape.1 as f64 - 1.0) / 2.0, (shape.2 as f64 - 1.0) / 2.0];
    in_plane_map_about(centre, angle, zoom)
}

/// [`in_plane_map`] about `centre` = `(y, x)` instead of the array's centre (a patch inside a
/// wider crop turns about its own centre).
pub fn in_plane_map_about(centre: [f64; 2], angle: f64, zoom: f64) -> IndexMap {
    let [cy, cx] = centre;
    let (sin, cos) = angle.sin_cos();
    let (a, b) = (cos / zoom, sin / zoom);
    // in_y = cy + a (y − cy) + b (x − cx); in_x = cx − b (y − cy) + a (x − cx)
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, a, b, cy - a * cy - b * cx],
        [0.0, -b, a, cx + b * cy - a * cx],
    ]
}
