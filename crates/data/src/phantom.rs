//! The synthetic imbalanced phantom: seeded abdominal-CT-like volumes with 13 organ-like
//! classes whose sizes span three orders of magnitude (a large "liver", "adrenal glands" and a
//! liver lesion of a few hundred voxels), touching (gallbladder on the liver, vessels beside
//! organs) and nested (lesion inside the liver) structures, texture, a bias field, noise and
//! partial-volume edges. The embedded default data set of the demo and the tests.

use ndarray::{Array3, Axis, Zip};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Class names, index = label value.
pub const PHANTOM_CLASSES: [&str; 14] = [
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "pancreas",
    "gallbladder",
    "liver_lesion",
    "adrenal_right",
    "adrenal_left",
    "vertebra",
];

/// Class names of the compact phantom ([`Anatomy::Compact`]), index = label value.
pub const COMPACT_PHANTOM_CLASSES: [&str; 8] = [
    "background",
    "liver",
    "spleen",
    "kidneys",
    "aorta",
    "gallbladder",
    "liver_lesion",
    "vertebra",
];

/// Which organs the phantom holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anatomy {
    /// The 13 organs of [`PHANTOM_CLASSES`]; left and right organs share an intensity and
    /// neighbouring organs have close ones, so telling them apart takes anatomical context.
    #[default]
    Abdomen,
    /// The 7 organs of [`COMPACT_PHANTOM_CLASSES`], each with its own intensity (kidneys one
    /// class, no adrenals, pancreas, stomach or vena cava, the gallbladder and the lesion wider): still
    /// imbalanced over three orders of magnitude, with touching and nested structures, but
    /// learnable by a small network in a few hundred steps on a CPU (the demo's data).
    Compact,
}

impl Anatomy {
    /// Class names, index = label value, background first.
    pub fn classes(self) -> &'static [&'static str] {
        match self {
            Anatomy::Abdomen => &PHANTOM_CLASSES,
            Anatomy::Compact => &COMPACT_PHANTOM_CLASSES,
        }
    }
}

/// The phantom's size and image quality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhantomConfig {
    /// Which organs.
    pub anatomy: Anatomy,
    /// Shape `[z, y, x]`; organ sizes scale with it.
    pub shape: [usize; 3],
    /// Spacing `[z, y, x]` mm written to the files.
    pub spacing: [f64; 3],
    /// Standard deviation of the additive Gaussian noise (organ contrasts are ~0.1–1).
    pub noise: f64,
    /// Amplitude of the multiplicative bias field.
    pub bias: f64,
    /// Gaussian blur (voxels) before noise: partial-volume edges.
    pub blur: f64,
}

impl PhantomConfig {
    /// The default phantom: the 13-organ abdomen, 96 × 128 × 128 voxels of 1.5 × 1 × 1 mm.
    pub const ABDOMEN: PhantomConfig = PhantomConfig {
        anatomy: Anatomy::Abdomen,
        shape: [96, 128, 128],
        spacing: [1.5, 1.0, 1.0],
        noise: 0.08,
        bias: 0.15,
        blur: 0.7,
    };
}

impl Default for PhantomConfig {
    fn default() -> Self {
        PhantomConfig::ABDOMEN
    }
}

/// Smooth value noise in about `[-1, 1]`: random values on a lattice of `cell` voxels,
/// interpolated with smoothstep weights.
fn value_noise(shape: [usize; 3], cell: f64, rng: &mut ChaCha8Rng) -> Array3<f32> {
    let lattice: [usize; 3] = std::array::from_fn(|a| (shape[a] as f64 / cell).ceil() as usize + 2);
    let values = Array3::from_shape_fn(lattice, |_| rng.random_range(-1.0f32..1.0));
    let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
    let mut out = Array3::<f32>::zeros(shape);
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(z, mut plane)| {
            let fz = z as f64 / cell;
            let (iz, tz) = (fz.floor() as usize, smooth(fz.fract() as f32));
            for ((y, x), v) in plane.indexed_iter_mut() {
                let fy = y as f64 / cell;
                let fx = x as f64 / cell;
                let (iy, ty) = (fy.floor() as usize, smooth(fy.fract() as f32));
                let (ix, tx) = (fx.floor() as usize, smooth(fx.fract() as f32));
                let mut acc = 0.0;
                for (dz, wz) in [(0, 1.0 - tz), (1, tz)] {
                    for (dy, wy) in [(0, 1.0 - ty), (1, ty)] {
                        for (dx, wx) in [(0, 1.0 - tx), (1, tx)] {
                            acc += wz * wy * wx * values[[iz + dz, iy + dy, ix + dx]];
                        }
                    }
                }
                *v = acc;
            }
        });
    out
}

/// Separable Gaussian blur of standard deviation `sigma` voxels (edges replicated).
fn blur(volume: &mut Array3<f32>, sigma: f64) {
    if sigma <= 0.0 {
        return;
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    for axis in 0..3 {
        let source = volume.clone();
        let n = volume.len_of(Axis(axis)) as isize;
        Zip::from(volume.lanes_mut(Axis(axis)))
            .and(source.lanes(Axis(axis)))
            .par_for_each(|mut out, input| {
                for i in 0..n {
                    let mut acc = 0.0;
                    for (j, k) in kernel.iter().enumerate() {
                        let src = (i + j as isize - radius).clamp(0, n - 1);
                        acc += k * input[src as usize];
                    }
                    out[i as usize] = acc;
                }
            });
    }
}

/// One organ: an ellipsoid (or a tube along z when `tube`) in normalised coordinates,
/// deformed by the shared shape noise.
struct Organ {
    label: u8,
    centre: [f64; 3],
    radii: [f64; 3],
    tube: Option<[f64; 2]>,
    intensity: f32,
    /// Paint only over voxels of this label (nested structures).
    inside: Option<u8>,
}

/// The 13 organs of [`Anatomy::Abdomen`], in painting order (later organs overwrite).
fn abdomen(jitter: &mut impl FnMut(f64, f64) -> f64) -> Vec<Organ> {
    #[rustfmt::skip]
    let organs = vec![
        Organ { label: 1, centre: [0.50, jitter(0.45, 0.02), jitter(0.31, 0.02)], radii: [0.42, 0.31, 0.25], tube: None, intensity: 0.55, inside: None },
        Organ { label: 9, centre: [0.40, jitter(0.33, 0.01), jitter(0.44, 0.01)], radii: [0.08, 0.045, 0.04], tube: None, intensity: 0.15, inside: None },
        Organ { label: 10, centre: [jitter(0.52, 0.06), jitter(0.47, 0.04), jitter(0.27, 0.04)], radii: [0.028, 0.024, 0.024], tube: None, intensity: 0.35, inside: Some(1) },
        Organ { label: 2, centre: [0.55, jitter(0.52, 0.02), jitter(0.75, 0.02)], radii: [0.15, 0.10, 0.075], tube: None, intensity: 0.62, inside: None },
        Organ { label: 3, centre: [0.40, jitter(0.68, 0.01), jitter(0.32, 0.01)], radii: [0.13, 0.065, 0.05], tube: None, intensity: 0.78, inside: None },
        Organ { label: 4, centre: [0.43, jitter(0.68, 0.01), jitter(0.69, 0.01)], radii: [0.13, 0.065, 0.05], tube: None, intensity: 0.78, inside: None },
        Organ { label: 5, centre: [0.63, jitter(0.36, 0.02), jitter(0.62, 0.02)], radii: [0.13, 0.11, 0.10], tube: None, intensity: 0.22, inside: None },
        Organ { label: 8, centre: [0.50, jitter(0.55, 0.01), 0.53], radii: [0.045, 0.04, 0.14], tube: None, intensity: 0.45, inside: None },
        Organ { label: 6, centre: [0.50, 0.64, 0.53], radii: [0.0, 0.0, 0.0], tube: Some([0.037, 0.037]), intensity: 0.98, inside: None },
        Organ { label: 7, centre: [0.50, 0.62, 0.44], radii: [0.0, 0.0, 0.0], tube: Some([0.032, 0.036]), intensity: 0.86, inside: None },
        Organ { label: 11, centre: [jitter(0.62, 0.02), 0.62, 0.37], radii: [0.045, 0.032, 0.026], tube: None, intensity: 0.5, inside: None },
        Organ { label: 12, centre: [jitter(0.64, 0.02), 0.62, 0.65], radii: [0.045, 0.032, 0.026], tube: None, intensity: 0.5, inside: None },
        Organ { label: 13, centre: [0.50, 0.82, 0.50], radii: [0.0, 0.0, 0.0], tube: Some([0.07, 0.065]), intensity: 1.6, inside: None },
    ];
    organs
}

/// The 7 organs of [`Anatomy::Compact`]: the abdomen's geometry with a larger gallbladder and
/// lesion, each class its own intensity (0.3 apart or more; background 0, organs −0.35–2.5).
fn compact(jitter: &mut impl FnMut(f64, f64) -> f64) -> Vec<Organ> {
    #[rustfmt::skip]
    let organs = vec![
        Organ { label: 1, centre: [0.50, jitter(0.45, 0.02), jitter(0.31, 0.02)], radii: [0.42, 0.31, 0.25], tube: None, intensity: 0.55, inside: None },
        Organ { label: 5, centre: [0.40, jitter(0.33, 0.01), jitter(0.44, 0.01)], radii: [0.10, 0.06, 0.052], tube: None, intensity: -0.35, inside: None },
        Organ { label: 6, centre: [jitter(0.52, 0.06), jitter(0.47, 0.04), jitter(0.27, 0.04)], radii: [0.1, 0.09, 0.09], tube: None, intensity: 0.95, inside: Some(1) },
        Organ { label: 2, centre: [0.55, jitter(0.52, 0.02), jitter(0.75, 0.02)], radii: [0.15, 0.10, 0.075], tube: None, intensity: 1.25, inside: None },
        Organ { label: 3, centre: [0.40, jitter(0.68, 0.01), jitter(0.32, 0.01)], radii: [0.13, 0.065, 0.05], tube: None, intensity: 1.6, inside: None },
        Organ { label: 3, centre: [0.43, jitter(0.68, 0.01), jitter(0.69, 0.01)], radii: [0.13, 0.065, 0.05], tube: None, intensity: 1.6, inside: None },
        Organ { label: 4, centre: [0.50, 0.64, 0.53], radii: [0.0, 0.0, 0.0], tube: Some([0.037, 0.037]), intensity: 2.0, inside: None },
        Organ { label: 7, centre: [0.50, 0.82, 0.50], radii: [0.0, 0.0, 0.0], tube: Some([0.07, 0.065]), intensity: 2.5, inside: None },
    ];
    organs
}

/// Largest phantom, in voxels (a 1024³ volume): the generator holds a few f32 copies.
pub const MAX_PHANTOM_VOXELS: u64 = 1 << 30;

impl PhantomConfig {
    /// Checks the settings before anything is allocated or written: every axis at least 8
    /// voxels, at most [`MAX_PHANTOM_VOXELS`] in all, finite non-negative noise, bias and
    /// blur, positive spacing.
    pub fn validate(&self) -> Result<()> {
        let voxels = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n as u64));
        if voxels.is_none_or(|v| v > MAX_PHANTOM_VOXELS) {
            return Err(DataError::Invalid(format!(
                "phantom shape {:?}: more than {MAX_PHANTOM_VOXELS} voxels",
                self.shape
            )));
        }
        if self.shape.iter().any(|&n| n < 8) {
            return Err(DataError::Invalid(format!(
                "phantom shape {:?}: every axis needs at least 8 voxels",
                self.shape
            )));
        }
        let finite = [self.noise, self.bias, self.blur];
        if finite.iter().any(|v| !(v.is_finite() && *v >= 0.0))
            || self.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(DataError::Invalid(format!(
                "phantom noise {}, bias {} and blur {} must be finite and non-negative, spacing {:?} positive",
                self.noise, self.bias, self.blur, self.spacing
            )));
        }
        Ok(())
    }
}

/// Generates one phantom `(image, labels)` of `config.shape` from `seed`.
pub fn phantom(config: &PhantomConfig, seed: u64) -> Result<(Array3<f32>, Array3<u8>)> {
    config.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shape = config.shape;
    let shape_noise = value_noise(shape, (shape[1] as f64 / 6.0).max(2.0), &mut rng);
    let texture = value_noise(shape, 3.0, &mut rng);
    let mut jitter = |v: f64, amount: f64| v + rng.random_range(-amount..amount);
    let organs = match config.anatomy {
        Anatomy::Abdomen => abdomen(&mut jitter),
        Anatomy::Compact => compact(&mut jitter),
    };
    let mut labels = Array3::<u8>::zeros(shape);
    let mut body = Array3::<bool>::from_elem(shape, false);
    let norm = |i: usize, n: usize| (i as f64 + 0.5) / n as f64;
    Zip::indexed(&mut body).for_each(|(_, y, x), b| {
        let (py, px) = (norm(y, shape[1]) - 0.5, norm(x, shape[2]) - 0.5);
        *b = (py / 0.44).powi(2) + (px / 0.47).powi(2) < 1.0;
    });
    let mut intensity = vec![0.0f32; 256];
    for organ in &organs {
        intensity[organ.label as usize] = organ.intensity;
        Zip::indexed(&mut labels)
            .and(&shape_noise)
            .and(&body)
            .par_for_each(|(z, y, x), l, &noise, &inside_body| {
                if !inside_body {
                    return;
                }
                let p = [norm(z, shape[0]), norm(y, shape[1]), norm(x, shape[2])];
                let f = match organ.tube {
                    Some([ry, rx]) => {
                        let taper = if (0.08..0.92).contains(&p[0]) {
                            0.0
                        } else {
                            4.0
                        };
                        ((p[1] - organ.centre[1]) / ry).powi(2)
                            + ((p[2] - organ.centre[2]) / rx).powi(2)
                            + taper
                    }
                    None => (0..3)
                        .map(|a| ((p[a] - organ.centre[a]) / organ.radii[a]).powi(2))
                        .sum::<f64>(),
                };
                if f + 0.35 * noise as f64 * f.min(1.5) < 1.0
                    && organ.inside.is_none_or(|host| *l == host)
                {
                    *l = organ.label;
                }
            });
    }
    // Intensities: air outside the body, soft tissue inside, each organ its own mean; texture,
    // partial-volume blur, bias field, noise.
    let mut image = Array3::<f32>::zeros(shape);
    Zip::from(&mut image)
        .and(&labels)
        .and(&body)
        .and(&texture)
        .par_for_each(|v, &l, &b, &t| {
            *v = if !b {
                -1.0
            } else if l == 0 {
                0.05 * t
            } else {
                intensity[l as usize] + 0.06 * t
            };
        });
    blur(&mut image, config.blur);
    let (a, b, c) = (
        rng.random_range(-1.0..1.0),
        rng.random_range(-1.0..1.0),
        rng.random_range(-1.0..1.0),
    );
    let normal = Normal::new(0.0f32, config.noise as f32)
        .map_err(|e| DataError::Invalid(format!("phantom noise {}: {e}", config.noise)))?;
    let mut noise_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    for ((z, y, x), v) in image.indexed_iter_mut() {
        let p = [
            norm(z, shape[0]) - 0.5,
            norm(y, shape[1]) - 0.5,
            norm(x, shape[2]) - 0.5,
        ];
        let field = 1.0 + config.bias * (a * p[0] + b * p[1] + c * p[2] + 0.5 * (p[1] * p[2]));
        *v = *v * field as f32 + normal.sample(&mut noise_rng);
    }
    Ok((image, labels))
}

/// Voxel count per class of a label volume (index = class).
pub fn class_sizes(labels: &Array3<u8>, classes: usize) -> Vec<usize> {
    let mut sizes = vec![0usize; classes.max(1)];
    for &l in labels {
        if (l as usize) < sizes.len() {
            sizes[l as usize] += 1;
        }
    }
    sizes
}
