//! Seeded spatial and intensity augmentation of an image and its labels together (image by
//! trilinear interpolation, labels by nearest neighbour): the paper's (the default) and nnU-Net's
//! ([`AugmentConfig::nnunet`]). The deterministic cores of nnU-Net's image-only transforms are
//! in [`intensity`]; geometric transforms move labels and maps with the image, intensity
//! transforms touch the image only.

pub mod intensity;

use ndarray::{Array3, Array4, Axis};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::resample::{IndexMap, Interpolation, sample};

/// Which axes a rotation turns about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationAxes {
    /// About z only (in the axial plane), by an angle uniform in `[0, max]` with a random sign:
    /// the paper's.
    #[default]
    Axial,
    /// About z, y and x: three angles, each uniform in `[−max, max]` (nnU-Net's
    /// `SpatialTransform`), composed as [`Augmentation::matrix`] says.
    All,
}

/// What a drawn scale factor means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleMode {
    /// An in-plane zoom `ζ` uniform in `scale_range`: `(y, x)` sampled at `c + (o − c)/ζ`, so
    /// `ζ > 1` enlarges.
    #[default]
    InPlaneZoom,
    /// nnU-Net's scaling: `s` uniform in `scale_range` is the sampling step along all three
    /// axes, `c + s (o − c)` (a zoom of `1/s`: `s > 1` shrinks objects).
    IsotropicStep,
}

/// Which augmentations are drawn, and how often. The default is the paper's (formulas §6):
/// rotation in the axial plane by an angle uniform in `[0°, 15°]` with a random sign,
/// probability 0.2; a horizontal or vertical flip, probability 0.2; nothing else. Every field
/// added for nnU-Net's augmentation ([`AugmentConfig::nnunet`]) defaults to off, and a
/// transform whose probability is 0 draws no random number, so the default config draws and
/// makes exactly the patches it made before they existed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Probability of a rotation.
    pub rotation_probability: f64,
    /// Largest rotation angle, degrees (about each axis with [`RotationAxes::All`]).
    pub max_rotation_degrees: f64,
    /// About which axes a rotation turns.
    pub rotation_axes: RotationAxes,
    /// Probability of a flip (x or y, equally likely).
    pub flip_probability: f64,
    /// Probability of a zoom.
    pub scale_probability: f64,
    /// Zoom factor range (the sampling step's with [`ScaleMode::IsotropicStep`]).
    pub scale_range: [f64; 2],
    /// What the drawn factor means.
    pub scale_mode: ScaleMode,
    /// Probability of an intensity change `x (1 + a) + b` per channel.
    pub intensity_probability: f64,
    /// `a` is uniform in `±intensity_scale`.
    pub intensity_scale: f64,
    /// `b` is uniform in `±intensity_shift` (in normalised units).
    pub intensity_shift: f64,
    /// Probability that each of z, y and x is mirrored (independently).
    pub mirror_probability: f64,
    /// Probability of additive Gaussian noise.
    pub noise_probability: f64,
    /// Range of the noise's standard deviation `σ` (nnU-Net's `noise_variance`, which it uses as
    /// the standard deviation).
    pub noise_sigma: [f64; 2],
    /// Probability of a Gaussian blur.
    pub blur_probability: f64,
    /// Probability that a blur touches each channel.
    pub blur_channel_probability: f64,
    /// Range of the blur's `σ` in voxels, drawn per channel and axis.
    pub blur_sigma: [f64; 2],
    /// Probability of a multiplicative brightness change (a factor per channel).
    pub brightness_probability: f64,
    /// Range of the brightness factor.
    pub brightness_range: [f64; 2],
    /// Probability of a contrast change (a factor per channel).
    pub contrast_probability: f64,
    /// Range of the contrast factor.
    pub contrast_range: [f64; 2],
    /// Probability of a simulated low resolution.
    pub low_resolution_probability: f64,
    /// Probability that it touches each channel.
    pub low_resolution_channel_probability: f64,
    /// Range of its zoom (the fraction of voxels kept per axis).
    pub low_resolution_zoom: [f64; 2],
    /// Probability of a gamma change of the inverted image (`−x`, a `γ` per channel).
    pub gamma_inverted_probability: f64,
    /// Probability of a gamma change (a `γ` per channel).
    pub gamma_probability: f64,
    /// Range of `γ`.
    pub gamma_range: [f64; 2],
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            rotation_probability: 0.2,
            max_rotation_degrees: 15.0,
            rotation_axes: RotationAxes::Axial,
            flip_probability: 0.2,
            scale_probability: 0.0,
            scale_range: [0.85, 1.25],
            scale_mode: ScaleMode::InPlaneZoom,
            intensity_probability: 0.0,
            intensity_scale: 0.1,
            intensity_shift: 0.1,
            mirror_probability: 0.0,
            noise_probability: 0.0,
            noise_sigma: [0.0, 0.1],
            blur_probability: 0.0,
            blur_channel_probability: 0.5,
            blur_sigma: [0.5, 1.0],
            brightness_probability: 0.0,
            brightness_range: [0.75, 1.25],
            contrast_probability: 0.0,
            contrast_range: [0.75, 1.25],
            low_resolution_probability: 0.0,
            low_resolution_channel_probability: 0.5,
            low_resolution_zoom: [0.5, 1.0],
            gamma_inverted_probability: 0.0,
            gamma_probability: 0.0,
            gamma_range: [0.7, 1.5],
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

    /// nnU-Net v2's default training augmentation (`nnUNetTrainer.get_training_transforms`,
    /// batchgeneratorsv2, 3D data), in the order applied; `x` is one channel, `c` the patch's
    /// centre, `o` an output voxel; a factor "split at 1" (nnU-Net's `BGContrast`) is, with
    /// probability ½, uniform in `[low, 1)`, else uniform in `[1, high]`:
    ///
    /// 1. rotation, probability 0.2: angles about z, y and x each uniform in `[−30°, 30°]`;
    ///    scaling, probability 0.2: one step `s` uniform in `[0.7, 1.4]` for all axes; the patch
    ///    samples `c + s R (o − c)` (image trilinear, labels nearest);
    /// 2. Gaussian noise, probability 0.1: `x + σ n`, `σ` uniform in `[0, 0.1]`, `n` standard
    ///    normal, one field for all channels;
    /// 3. Gaussian blur, probability 0.2, each channel with probability 0.5: `σ` uniform in
    ///    `[0.5, 1]` voxels per channel and axis ([`intensity::gaussian_blur`]);
    /// 4. brightness, probability 0.15: `f x`, `f` split at 1 in `[0.75, 1.25]` per channel;
    /// 5. contrast, probability 0.15: `clamp(μ + f (x − μ), min x, max x)`, `f` split at 1 in
    ///    `[0.75, 1.25]` per channel;
    /// 6. low resolution, probability 0.25, each channel with probability 0.5: zoom `z`
    ///    uniform in `[0.5, 1]`, nearest down to `round(n z)` voxels per axis, trilinear back
    ///    ([`intensity::low_resolution`]);
    /// 7. gamma of the inverted image, probability 0.1, then gamma, probability 0.3: `γ` split
    ///    at 1 in `[0.7, 1.5]` per channel, `m + r ((x − m)/r)^γ` with the mean and standard
    ///    deviation restored ([`intensity::gamma`]);
    /// 8. mirroring of each of z, y and x with probability 0.5.
    ///
    /// Unlike nnU-Net, rotation and scaling read a crop widened by their reach (not a larger
    /// initial patch) and clamp at the volume's edges rather than padding with zeros, and the
    /// rotation is rigid in voxels (nnU-Net's turns normalised coordinates, a shear on
    /// non-cubic patches). nnU-Net's in-plane-only variant for anisotropic data is not made.
    pub fn nnunet() -> Self {
        AugmentConfig {
            rotation_probability: 0.2,
            max_rotation_degrees: 30.0,
            rotation_axes: RotationAxes::All,
            flip_probability: 0.0,
            scale_probability: 0.2,
            scale_range: [0.7, 1.4],
            scale_mode: ScaleMode::IsotropicStep,
            mirror_probability: 0.5,
            noise_probability: 0.1,
            blur_probability: 0.2,
            brightness_probability: 0.15,
            contrast_probability: 0.15,
            low_resolution_probability: 0.25,
            gamma_inverted_probability: 0.1,
            gamma_probability: 0.3,
            ..AugmentConfig::default()
        }
    }

    /// Every field out of its domain, as `name = value (rule)`: probabilities in `[0, 1]`,
    /// finite non-negative magnitudes and ranges `[low, high]` with `low ≤ high`, each below
    /// its ceiling ([`AugmentConfig::magnitudes`], [`AugmentConfig::ranges`]: beyond it an
    /// augmentation turns patches into infinities, needs an unbounded blur kernel, or means
    /// nothing more, as a rotation past 180° or a "low resolution" zoom above 1).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, p) in self.probabilities() {
            if !(0.0..=1.0).contains(&p) {
                out.push(format!("{name} = {p} (in [0, 1])"));
            }
        }
        for (name, v, max) in self.magnitudes() {
            if !(v.is_finite() && (0.0..=max).contains(&v)) {
                out.push(format!("{name} = {v} (finite, 0 ≤ value ≤ {max})"));
            }
        }
        for (name, [lo, hi], positive, max) in self.ranges() {
            let low_ok = if positive { lo > 0.0 } else { lo >= 0.0 };
            if !(lo.is_finite() && hi.is_finite() && low_ok && lo <= hi && hi <= max) {
                let rule = if positive { "0 < low" } else { "0 ≤ low" };
                out.push(format!(
                    "{name} = [{lo}, {hi}] ({rule} ≤ high ≤ {max}, finite)"
                ));
            }
        }
        out
    }

    /// Each magnitude with its ceiling: degrees (180 reaches every angle), a relative
    /// intensity change, a shift in normalised units.
    fn magnitudes(&self) -> [(&'static str, f64, f64); 3] {
        [
            ("max_rotation_degrees", self.max_rotation_degrees, 180.0),
            ("intensity_scale", self.intensity_scale, 10.0),
            ("intensity_shift", self.intensity_shift, 1000.0),
        ]
    }

    fn probabilities(&self) -> [(&'static str, f64); 14] {
        [
            ("rotation_probability", self.rotation_probability),
            ("flip_probability", self.flip_probability),
            ("scale_probability", self.scale_probability),
            ("intensity_probability", self.intensity_probability),
            ("mirror_probability", self.mirror_probability),
            ("noise_probability", self.noise_probability),
            ("blur_probability", self.blur_probability),
            ("blur_channel_probability", self.blur_channel_probability),
            ("brightness_probability", self.brightness_probability),
            ("contrast_probability", self.contrast_probability),
            (
                "low_resolution_probability",
                self.low_resolution_probability,
            ),
            (
                "low_resolution_channel_probability",
                self.low_resolution_channel_probability,
            ),
            (
                "gamma_inverted_probability",
                self.gamma_inverted_probability,
            ),
            ("gamma_probability", self.gamma_probability),
        ]
    }

    /// Each range with whether its low end must be > 0 (else ≥ 0) and its ceiling: factors
    /// up to 10, a noise σ up to 1000 (normalised units), a blur σ up to 16 voxels (a kernel of
    /// 97 taps), a low-resolution zoom up to 1 (the fraction of voxels kept).
    fn ranges(&self) -> [(&'static str, [f64; 2], bool, f64); 7] {
        [
            ("scale_range", self.scale_range, true, 10.0),
            ("noise_sigma", self.noise_sigma, false, 1000.0),
            ("blur_sigma", self.blur_sigma, false, MAX_BLUR_SIGMA),
            ("brightness_range", self.brightness_range, false, 10.0),
            ("contrast_range", self.contrast_range, false, 10.0),
            ("low_resolution_zoom", self.low_resolution_zoom, true, 1.0),
            ("gamma_range", self.gamma_range, true, 10.0),
        ]
    }
}

/// The widest blur an augmentation takes, σ in voxels ([`intensity::gaussian_kernel`] clamps
/// to it, so no σ asks for an unbounded kernel).
pub const MAX_BLUR_SIGMA: f64 = 16.0;

/// One drawn image-only transform of nnU-Net's ([`intensity`]), in the order applied.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageTransform {
    /// [`intensity::gaussian_noise`] of `sigma` from `seed`, the same field in every channel.
    Noise {
        /// Standard deviation.
        sigma: f64,
        /// Seed of the noise field.
        seed: u64,
    },
    /// [`intensity::gaussian_blur`] of `channel` with `sigma` (voxels, `[z, y, x]`).
    Blur {
        /// The channel.
        channel: usize,
        /// Per axis.
        sigma: [f64; 3],
    },
    /// [`intensity::brightness`] of `channel` by `factor`.
    Brightness {
        /// The channel.
        channel: usize,
        /// The factor.
        factor: f64,
    },
    /// [`intensity::contrast`] of `channel` by `factor`.
    Contrast {
        /// The channel.
        channel: usize,
        /// The factor.
        factor: f64,
    },
    /// [`intensity::low_resolution`] of `channel` at `zoom`.
    LowResolution {
        /// The channel.
        channel: usize,
        /// The fraction of voxels kept per axis.
        zoom: f64,
    },
    /// [`intensity::gamma`] of `channel` (statistics retained), of `−x` when `invert`.
    Gamma {
        /// The channel.
        channel: usize,
        /// The exponent.
        gamma: f64,
        /// Whether the image is inverted around the change.
        invert: bool,
    },
}

impl ImageTransform {
    /// The channel it touches (`None`: every channel).
    pub fn channel(&self) -> Option<usize> {
        use ImageTransform::*;
        match *self {
            Noise { .. } => None,
            Blur { channel, .. }
            | Brightness { channel, .. }
            | Contrast { channel, .. }
            | LowResolution { channel, .. }
            | Gamma { channel, .. } => Some(channel),
        }
    }

    /// Applies the transform to `image` `[c, z, y, x]` (a channel beyond `c` is left alone).
    pub fn apply(&self, image: &mut Array4<f32>) {
        use ImageTransform::*;
        let Some(channel) = self.channel() else {
            if let Noise { sigma, seed } = *self {
                for x in image.axis_iter_mut(Axis(0)) {
                    intensity::gaussian_noise(x, sigma, seed);
                }
            }
            return;
        };
        if channel >= image.dim().0 {
            return;
        }
        let x = image.index_axis_mut(Axis(0), channel);
        match *self {
            Blur { sigma, .. } => intensity::gaussian_blur(x, sigma),
            Brightness { factor, .. } => intensity::brightness(x, factor),
            Contrast { factor, .. } => intensity::contrast(x, factor),
            LowResolution { zoom, .. } => intensity::low_resolution(x, zoom),
            Gamma { gamma, invert, .. } => intensity::gamma(x, gamma, invert, true),
            Noise { .. } => {}
        }
    }
}

/// The random choices of one augmentation, drawn all at once before any is applied (so the
/// draws, and thus a seeded run, do not depend on the array sizes).
#[derive(Debug, Clone, PartialEq)]
pub struct Augmentation {
    /// Rotation angle about z (in the axial plane), radians (0: none).
    pub angle: f64,
    /// Rotation angles about y and x, radians (0: none; [`RotationAxes::All`] only).
    pub tilt: [f64; 2],
    /// In-plane zoom factor (1: none).
    pub zoom: f64,
    /// Zoom factor along z (1: none; [`ScaleMode::IsotropicStep`] only).
    pub zoom_z: f64,
    /// The label array's axis that is reversed (1 = y, 2 = x), if any.
    pub flip: Option<usize>,
    /// Whether each label axis `[z, y, x]` is mirrored (after `flip`).
    pub mirror: [bool; 3],
    /// Per-channel intensity change `x (1 + a) + b` as `(1 + a, b)`, if drawn.
    pub intensity: Option<Vec<(f64, f64)>>,
    /// nnU-Net's image-only transforms drawn, in the order applied (after `intensity`).
    pub transforms: Vec<ImageTransform>,
}

impl Augmentation {
    /// No change.
    pub fn identity() -> Self {
        Augmentation {
            angle: 0.0,
            tilt: [0.0; 2],
            zoom: 1.0,
            zoom_z: 1.0,
            flip: None,
            mirror: [false; 3],
            intensity: None,
            transforms: Vec::new(),
        }
    }

    /// Draws the augmentation of an image of `channels` channels from `rng`: rotation, zoom,
    /// flip and intensity change as the paper's code always drew them, then each of nnU-Net's
    /// transforms only where its probability is above 0.
    pub fn draw<R: Rng>(config: &AugmentConfig, channels: usize, rng: &mut R) -> Self {
        let (angle, tilt) = draw_rotation(config, rng);
        let (zoom, zoom_z) = draw_scale(config, rng);
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
        let mut mirror = [false; 3];
        if config.mirror_probability > 0.0 {
            mirror = std::array::from_fn(|_| chance(rng, config.mirror_probability));
        }
        Augmentation {
            angle,
            tilt,
            zoom,
            zoom_z,
            flip,
            mirror,
            intensity,
            transforms: draw_transforms(config, channels, rng),
        }
    }

    /// Whether the rotation or zoom moves voxels.
    pub fn resamples(&self) -> bool {
        self.angle != 0.0 || self.zoom != 1.0 || self.volumetric()
    }

    /// Whether the resampling leaves the axial plane (a tilt or a zoom along z): it then maps
    /// all three axes ([`Augmentation::matrix`]) and a patch reads a halo of
    /// [`Augmentation::reach`]; otherwise it is the paper's [`in_plane_map_about`].
    pub fn volumetric(&self) -> bool {
        self.tilt != [0.0; 2] || self.zoom_z != 1.0
    }

    /// The linear part `A` of the resampling, output voxel `o` reading input `c + A (o − c)`:
    /// `A = Z⁻¹ R_z(angle) R_y(tilt₀) R_x(tilt₁)`, `Z = diag(zoom_z, zoom, zoom)`, each `R` a
    /// [`rotation_matrix`].
    pub fn matrix(&self) -> [[f64; 3]; 3] {
        let r = matmul(
            rotation_matrix(0, self.angle),
            matmul(
                rotation_matrix(1, self.tilt[0]),
                rotation_matrix(2, self.tilt[1]),
            ),
        );
        let zoom = [self.zoom_z, self.zoom, self.zoom];
        std::array::from_fn(|a| r[a].map(|v| v / zoom[a]))
    }

    /// The index map about `centre` = `(z, y, x)`: [`in_plane_map_about`] unless
    /// [`Augmentation::volumetric`], then [`volume_map_about`] of [`Augmentation::matrix`].
    pub fn index_map(&self, centre: [f64; 3]) -> IndexMap {
        if self.volumetric() {
            volume_map_about(centre, self.matrix())
        } else {
            in_plane_map_about([centre[1], centre[2]], self.angle, self.zoom)
        }
    }

    /// How far, per axis, a volumetric resampling of a box of `shape` about its centre reads
    /// outside the box: `⌈Σ_b |A_ab − δ_ab| (n_b − 1)/2⌉ + 1` (the farthest corner, plus the
    /// interpolation's second neighbour); zero when not [`Augmentation::volumetric`].
    pub fn reach(&self, shape: [usize; 3]) -> [usize; 3] {
        if !self.volumetric() {
            return [0; 3];
        }
        let a = self.matrix();
        std::array::from_fn(|r| {
            let far: f64 = (0..3)
                .map(|b| (a[r][b] - if r == b { 1.0 } else { 0.0 }).abs() * half_extent(shape[b]))
                .sum();
            far.ceil() as usize + 1
        })
    }

    /// Whether each label axis `[z, y, x]` ends up reversed (`flip` and `mirror` together).
    pub fn reversed_axes(&self) -> [bool; 3] {
        let mut axes = self.mirror;
        if let Some(axis) = self.flip.filter(|&a| a < 3) {
            axes[axis] = !axes[axis];
        }
        axes
    }

    /// Applies the augmentation to `image` `[c, z, y, x]`, `label` `[z, y, x]` and the `maps`
    /// that travel with the labels (nearest neighbour, like the labels), rotating and zooming
    /// about `centre` = `(z, y, x)` in array coordinates: resampling, reversal, intensity.
    pub fn apply(
        &self,
        image: &mut Array4<f32>,
        label: &mut Array3<u8>,
        maps: &mut [&mut Array3<f32>],
        centre: [f64; 3],
    ) {
        self.resample(image, label, maps, centre);
        self.reflect(image, label, maps);
        self.apply_intensity(image);
    }

    /// The rotation and zoom of [`Augmentation::apply`] alone, in place (edges clamped).
    pub fn resample(
        &self,
        image: &mut Array4<f32>,
        label: &mut Array3<u8>,
        maps: &mut [&mut Array3<f32>],
        centre: [f64; 3],
    ) {
        if !self.resamples() {
            return;
        }
        let map = self.index_map(centre);
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

    /// Reverses the [`Augmentation::reversed_axes`] of `image`, `label` and `maps`.
    pub fn reflect(
        &self,
        image: &mut Array4<f32>,
        label: &mut Array3<u8>,
        maps: &mut [&mut Array3<f32>],
    ) {
        let axes = self.reversed_axes();
        if !axes.contains(&true) {
            return;
        }
        for axis in (0..3).filter(|&a| axes[a]) {
            label.invert_axis(Axis(axis));
            image.invert_axis(Axis(axis + 1));
            for m in maps.iter_mut() {
                m.invert_axis(Axis(axis));
            }
        }
        *label = label.as_standard_layout().into_owned();
        *image = image.as_standard_layout().into_owned();
        for m in maps.iter_mut() {
            **m = m.as_standard_layout().into_owned();
        }
    }

    /// The image-only part: the paper's `x (1 + a) + b`, then nnU-Net's [`ImageTransform`]s.
    pub fn apply_intensity(&self, image: &mut Array4<f32>) {
        if let Some(draws) = &self.intensity {
            for (mut channel, &(a, b)) in image.axis_iter_mut(Axis(0)).zip(draws) {
                channel.mapv_inplace(|v| (v as f64 * a + b) as f32);
            }
        }
        for transform in &self.transforms {
            transform.apply(image);
        }
    }
}

fn half_extent(n: usize) -> f64 {
    n.saturating_sub(1) as f64 / 2.0
}

/// `true` with probability `p`, drawing nothing when `p ≤ 0` (or NaN).
fn chance<R: Rng>(rng: &mut R, p: f64) -> bool {
    p > 0.0 && rng.random_bool(p.min(1.0))
}

/// `low + (high − low) u`, `u` uniform in `[0, 1)` (never panics on an empty range).
fn uniform<R: Rng>(rng: &mut R, [low, high]: [f64; 2]) -> f64 {
    low + (high - low) * rng.random::<f64>()
}

/// A factor split at 1 (nnU-Net's `BGContrast`): with probability ½ uniform in `[low, 1)`,
/// else uniform in `[1, high]`; one side only when the range does not straddle 1.
fn split_factor<R: Rng>(rng: &mut R, [low, high]: [f64; 2]) -> f64 {
    let below = rng.random_bool(0.5);
    if (below && low < 1.0) || high <= 1.0 {
        uniform(rng, [low, high.min(1.0)])
    } else {
        uniform(rng, [low.max(1.0), high])
    }
}

/// The rotation's angle about z and tilts about y and x, radians.
fn draw_rotation<R: Rng>(config: &AugmentConfig, rng: &mut R) -> (f64, [f64; 2]) {
    if !rng.random_bool(config.rotation_probability.clamp(0.0, 1.0)) {
        return (0.0, [0.0; 2]);
    }
    let max = config.max_rotation_degrees.max(0.0);
    match config.rotation_axes {
        RotationAxes::Axial => {
            let angle = rng.random_range(0.0..=max).to_radians();
            (if rng.random_bool(0.5) { -angle } else { angle }, [0.0; 2])
        }
        RotationAxes::All => {
            let z = uniform(rng, [-max, max]).to_radians();
            let y = uniform(rng, [-max, max]).to_radians();
            (z, [y, uniform(rng, [-max, max]).to_radians()])
        }
    }
}

/// The in-plane zoom and the zoom along z.
fn draw_scale<R: Rng>(config: &AugmentConfig, rng: &mut R) -> (f64, f64) {
    if !rng.random_bool(config.scale_probability.clamp(0.0, 1.0)) {
        return (1.0, 1.0);
    }
    let [lo, hi] = config.scale_range;
    let factor = if hi > lo && (hi - lo).is_finite() {
        rng.random_range(lo..hi)
    } else {
        lo
    };
    match config.scale_mode {
        ScaleMode::InPlaneZoom => (factor, 1.0),
        ScaleMode::IsotropicStep => (1.0 / factor, 1.0 / factor),
    }
}

/// With probability `p`, for each channel with probability `p_channel`, the transform `make`
/// draws for it.
fn per_channel<R: Rng>(
    rng: &mut R,
    (p, p_channel): (f64, f64),
    channels: usize,
    out: &mut Vec<ImageTransform>,
    make: impl Fn(&mut R, usize) -> ImageTransform,
) {
    if chance(rng, p) {
        for channel in 0..channels {
            if chance(rng, p_channel) {
                out.push(make(rng, channel));
            }
        }
    }
}

/// nnU-Net's image-only transforms, in its order (each drawn only where its probability > 0).
fn draw_transforms<R: Rng>(
    config: &AugmentConfig,
    channels: usize,
    rng: &mut R,
) -> Vec<ImageTransform> {
    use ImageTransform::*;
    let c = config;
    let mut out = Vec::new();
    if chance(rng, c.noise_probability) {
        let sigma = uniform(rng, c.noise_sigma);
        let seed = rng.random();
        out.push(Noise { sigma, seed });
    }
    let blur = (c.blur_probability, c.blur_channel_probability);
    per_channel(rng, blur, channels, &mut out, |rng, channel| Blur {
        channel,
        sigma: std::array::from_fn(|_| uniform(rng, c.blur_sigma)),
    });
    per_channel(
        rng,
        (c.brightness_probability, 1.0),
        channels,
        &mut out,
        |rng, channel| {
            let factor = split_factor(rng, c.brightness_range);
            Brightness { channel, factor }
        },
    );
    per_channel(
        rng,
        (c.contrast_probability, 1.0),
        channels,
        &mut out,
        |rng, channel| {
            let factor = split_factor(rng, c.contrast_range);
            Contrast { channel, factor }
        },
    );
    let low = (
        c.low_resolution_probability,
        c.low_resolution_channel_probability,
    );
    per_channel(rng, low, channels, &mut out, |rng, channel| LowResolution {
        channel,
        zoom: uniform(rng, c.low_resolution_zoom),
    });
    for (p, invert) in [
        (c.gamma_inverted_probability, true),
        (c.gamma_probability, false),
    ] {
        per_channel(rng, (p, 1.0), channels, &mut out, |rng, channel| Gamma {
            channel,
            gamma: split_factor(rng, c.gamma_range),
            invert,
        });
    }
    out
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
    let (_, nz, ny, nx) = image.dim();
    let centre = [nz, ny, nx].map(|n| (n as f64 - 1.0) / 2.0);
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

/// The rotation by `angle` (radians) about array axis `axis` (0 = z, 1 = y, 2 = x): on the
/// other two axes `(p, q)`, `p < q`, `[[cos, sin], [−sin, cos]]`, the identity on `axis`; as an
/// index map (input = `R` · output) it turns as `scipy.ndimage.rotate(..., axes=(p, q))`.
pub fn rotation_matrix(axis: usize, angle: f64) -> [[f64; 3]; 3] {
    let mut r = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let (p, q) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let (sin, cos) = angle.sin_cos();
    (r[p][p], r[p][q], r[q][p], r[q][q]) = (cos, sin, -sin, cos);
    r
}

/// The index map reading input `c + A (o − c)` for output voxel `o`, `centre` = `c` =
/// `(z, y, x)`.
pub fn volume_map_about(centre: [f64; 3], a: [[f64; 3]; 3]) -> IndexMap {
    std::array::from_fn(|r| {
        let t = centre[r] - (0..3).map(|b| a[r][b] * centre[b]).sum::<f64>();
        [a[r][0], a[r][1], a[r][2], t]
    })
}

/// `map` read from output indices shifted by `by`: `o ↦ map(o + by)`.
pub fn shift_map(map: &IndexMap, by: [f64; 3]) -> IndexMap {
    std::array::from_fn(|r| {
        let mut row = map[r];
        row[3] += (0..3).map(|b| map[r][b] * by[b]).sum::<f64>();
        row
    })
}

fn matmul(a: [[f64; 3]; 3], b: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    std::array::from_fn(|r| std::array::from_fn(|c| (0..3).map(|k| a[r][k] * b[k][c]).sum()))
}
