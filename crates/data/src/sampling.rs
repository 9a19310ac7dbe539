//! Patch sampling: random crops centred on foreground with a given positive/negative ratio
//! (MONAI's `RandCropByPosNegLabel`), optionally class-balanced so rare classes are seen; the
//! maps a loss needs, made so that each patch's map is the whole volume's map cropped (formulas §1).

use cwseg_morphology::{ContourSpec, contour_map, tubed_skeleton};
use ndarray::{Array3, Array4, Axis, s};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::augment::{AugmentConfig, Augmentation, shift_map};
use crate::crop::{pad_or_crop, pad_or_crop_channels};
use crate::error::{DataError, Result};
use crate::resample::{Interpolation, sample};

/// How patch centres are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplerConfig {
    /// Patch size `[z, y, x]`.
    pub size: [usize; 3],
    /// Relative weight of patches centred on a foreground voxel.
    pub positive: f64,
    /// Relative weight of patches centred on any voxel.
    pub negative: f64,
    /// Centre positive patches on a uniformly chosen present class first, then on one of its
    /// voxels (otherwise on a uniformly chosen foreground voxel, which favours large classes).
    pub class_balanced: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            size: [64, 64, 64],
            positive: 1.0,
            negative: 1.0,
            class_balanced: true,
        }
    }
}

/// A volume ready for sampling: image `[c, z, y, x]` and labels `[z, y, x]`, padded to at
/// least the patch size, with the voxel lists of every present foreground class.
#[derive(Debug, Clone)]
pub struct SamplingVolume {
    image: Array4<f32>,
    label: Array3<u8>,
    weights: Option<Array3<f32>>,
    classes: Vec<Vec<u32>>,
}

/// The halo of Skeleton Recall's tubed skeleton map that the trainer asks for
/// ([`PatchMaps::skeleton`]): 8 voxels per side, so that a tube of radius up to about 6 voxels
/// crossing a patch face keeps its centre line (and the 2-voxel tube around it) up to the face,
/// as in the whole volume's skeleton, for about 1.4× the thinning work of a bare 128³ patch.
pub const SKELETON_HALO: usize = 8;

/// The maps made for every patch (formulas §1, "training on patches").
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PatchMaps {
    /// The contour map under these settings: computed on the patch widened by the element's
    /// reach ([`cwseg_morphology::ErosionSpec::reach`]) on every side, clipped at the volume's
    /// edges, after augmentation, then cropped; without rotation or zoom it equals the whole
    /// volume's map cropped, bit for bit. `None`: no contour map.
    pub contour: Option<ContourSpec>,
    /// Regions (sets of class indices, at most 8) for region training: when given, the contour
    /// map is one per region, of the region's binary mask (the spec's `include_background`
    /// then always counts the outside), packed as bit `j` of each voxel
    /// ([`crate::Batch::region_contour_tensor`] unpacks them). Empty: one map of the classes.
    pub regions: Vec<Vec<u8>>,
    /// Skeleton Recall's tubed skeleton map (`cwseg_morphology::tubed_skeleton`: the skeleton of
    /// the foreground dilated twice by the cross, times the labels), made on the patch widened
    /// by this many voxels on every side (clipped at the volume's edges), after augmentation,
    /// then cropped. `None`: no skeleton map. A skeleton is not local: thinning erodes from
    /// every face of the array it is given, so a crop's skeleton is that of the widened crop,
    /// whose faces cut objects as the volume does not. Within the patch it equals the whole
    /// volume's skeleton where objects are thinner than about the halo around the patch faces
    /// (a tube crossing a face keeps its centre line up to the face); a thick object cut by the
    /// widened crop gets a skeleton shaped by the cut. `Some(0)` is the reference's choice (the
    /// skeleton of the augmented patch itself, whose tube centre lines stop about a radius short
    /// of the patch faces); the trainer uses [`SKELETON_HALO`].
    pub skeleton: Option<usize>,
}

impl PatchMaps {
    /// The contour map of `label` under these settings: the classes' union map, or the
    /// regions' maps packed as bits.
    fn contour_of(&self, spec: &ContourSpec, label: &Array3<u8>) -> Result<Array3<u8>> {
        if self.regions.is_empty() {
            return Ok(contour_map(label.view(), spec)?.into_union().mapv(u8::from));
        }
        let spec = ContourSpec {
            include_background: true,
            ..*spec
        };
        let mut packed = Array3::<u8>::zeros(label.dim());
        for (j, set) in self.regions.iter().enumerate().take(8) {
            let mask = label.mapv(|c| u8::from(set.contains(&c)));
            let map = contour_map(mask.view(), &spec)?.into_union();
            ndarray::Zip::from(&mut packed)
                .and(&map)
                .for_each(|p, &m| *p |= u8::from(m) << j);
        }
        Ok(packed)
    }
}

/// One training patch: image `[c, z, y, x]`, labels `[z, y, x]` and the maps asked for.
#[derive(Debug, Clone)]
pub struct Patch {
    /// The image.
    pub image: Array4<f32>,
    /// The class indices.
    pub label: Array3<u8>,
    /// The contour map (1 = contour), when [`PatchMaps::contour`] asks for it.
    pub contour: Option<Array3<u8>>,
    /// The tubed skeleton (class indices, 0 off the tube), when [`PatchMaps::skeleton`] asks
    /// for it.
    pub skeleton: Option<Array3<u8>>,
    /// The whole volume's voxel weights cropped, when the volume has them
    /// ([`SamplingVolume::with_weights`]).
    pub weights: Option<Array3<f32>>,
}

/// The tubed skeleton of the crop `inner .. inner + size` of `label`, made on that crop widened
/// by `halo` voxels per side (within `label`), then cropped.
fn skeleton_of(
    label: &Array3<u8>,
    inner: [usize; 3],
    size: [usize; 3],
    halo: usize,
) -> Result<Array3<u8>> {
    let shape = label.shape();
    let lo: [usize; 3] = std::array::from_fn(|a| inner[a].saturating_sub(halo));
    let hi: [usize; 3] = std::array::from_fn(|a| (inner[a] + size[a] + halo).min(shape[a]));
    let widened = label.slice(s![lo[0]..hi[0], lo[1]..hi[1], lo[2]..hi[2]]);
    let tube = tubed_skeleton(widened)?;
    let start: [usize; 3] = std::array::from_fn(|a| inner[a] - lo[a]);
    Ok(tube
        .slice(s![
            start[0]..start[0] + size[0],
            start[1]..start[1] + size[1],
            start[2]..start[2] + size[2]
        ])
        .to_owned())
}

/// A crop widened by a halo, and where the crop lies inside it.
struct Widened {
    image: Array4<f32>,
    label: Array3<u8>,
    weights: Option<Array3<f32>>,
    /// Start of the crop inside the widened arrays, `[z, y, x]`.
    inner: [usize; 3],
}

impl SamplingVolume {
    /// Indexes `image` and `label` for patches of `size` (padding them, centred, with zeros
    /// where smaller).
    pub fn new(image: Array4<f32>, label: Array3<u8>, size: [usize; 3]) -> Result<Self> {
        let (_, z, y, x) = image.dim();
        if label.dim() != (z, y, x) {
            return Err(DataError::Invalid(format!(
                "image of shape {:?} and label of shape {:?} differ",
                &image.shape()[1..],
                label.shape()
            )));
        }
        if size.contains(&0) {
            return Err(DataError::Invalid(format!(
                "patch size {size:?} has a zero"
            )));
        }
        let padded = [z.max(size[0]), y.max(size[1]), x.max(size[2])];
        let (image, label) = if padded != [z, y, x] {
            (
                pad_or_crop_channels(image.view(), padded, 0.0),
                pad_or_crop(label.view(), padded, 0),
            )
        } else {
            (image, label)
        };
        let mut classes: Vec<Vec<u32>> = vec![Vec::new(); 256];
        for (i, &l) in label.iter().enumerate() {
            if l != 0 {
                classes[l as usize].push(i as u32);
            }
        }
        Ok(SamplingVolume {
            image,
            label,
            weights: None,
            classes,
        })
    }

    /// Adds voxel weights computed on the whole volume (DWCE's distance maps reach further
    /// than any halo); each patch carries them cropped. `weights` has the shape of the labels
    /// given to [`SamplingVolume::new`] and is padded the same way.
    pub fn with_weights(mut self, weights: Array3<f32>) -> Result<Self> {
        let (_, z, y, x) = self.image.dim();
        let weights = if weights.dim() == (z, y, x) {
            weights
        } else {
            let w = weights.shape();
            if (0..3).any(|a| w[a] > [z, y, x][a]) {
                return Err(DataError::Invalid(format!(
                    "weight map of shape {w:?} does not fit the volume's {:?}",
                    [z, y, x]
                )));
            }
            pad_or_crop(weights.view(), [z, y, x], 0.0)
        };
        self.weights = Some(weights);
        Ok(self)
    }

    /// The image.
    pub fn image(&self) -> &Array4<f32> {
        &self.image
    }

    /// The labels.
    pub fn label(&self) -> &Array3<u8> {
        &self.label
    }

    /// Draws the start `[z, y, x]` of a patch of `config.size` (which fits: the volume was
    /// padded to the patch size).
    pub fn draw_start<R: Rng>(&self, config: &SamplerConfig, rng: &mut R) -> [usize; 3] {
        let (_, nz, ny, nx) = self.image.dim();
        let present: Vec<&Vec<u32>> = self.classes.iter().filter(|v| !v.is_empty()).collect();
        let total = config.positive.max(0.0) + config.negative.max(0.0);
        let positive = !present.is_empty()
            && total > 0.0
            && rng.random_bool((config.positive.max(0.0) / total).clamp(0.0, 1.0));
        let centre = if positive {
            let flat = if config.class_balanced {
                let voxels = present[rng.random_range(0..present.len())];
                voxels[rng.random_range(0..voxels.len())] as usize
            } else {
                let count: usize = present.iter().map(|v| v.len()).sum();
                let mut k = rng.random_range(0..count);
                let mut found = 0;
                for v in &present {
                    if k < v.len() {
                        found = v[k] as usize;
                        break;
                    }
                    k -= v.len();
                }
                found
            };
            [flat / (ny * nx), (flat / nx) % ny, flat % nx]
        } else {
            [
                rng.random_range(0..nz),
                rng.random_range(0..ny),
                rng.random_range(0..nx),
            ]
        };
        let n = [nz, ny, nx];
        std::array::from_fn(|a| {
            centre[a]
                .saturating_sub(config.size[a] / 2)
                .min(n[a].saturating_sub(config.size[a]))
        })
    }

    /// Draws one patch of `config.size` (padded with zeros where the volume is smaller).
    pub fn sample<R: Rng>(&self, config: &SamplerConfig, rng: &mut R) -> (Array4<f32>, Array3<u8>) {
        if !self.fits(config.size) {
            return (
                pad_or_crop_channels(self.image.view(), config.size, 0.0),
                pad_or_crop(self.label.view(), config.size, 0),
            );
        }
        let start = self.draw_start(config, rng);
        let w = self.widened(start, config.size, [0; 3]);
        (w.image, w.label)
    }

    /// Draws one patch with its maps: the patch is cut with a halo of the contour element's
    /// reach, augmented (rotation and zoom about the patch's own centre), its contour map made,
    /// then cropped. The random draws are those of [`SamplingVolume::sample`] followed by
    /// [`crate::augment()`]'s, so a seed gives the same patches with or without maps.
    pub fn sample_patch<R: Rng>(
        &self,
        config: &SamplerConfig,
        augment: &AugmentConfig,
        maps: &PatchMaps,
        rng: &mut R,
    ) -> Result<Patch> {
        if !self.fits(config.size) {
            return Err(DataError::Invalid(format!(
                "patch {:?} is larger than the volume {:?} it is drawn from",
                config.size,
                &self.image.shape()[1..]
            )));
        }
        let start = self.draw_start(config, rng);
        let augmentation = Augmentation::draw(augment, self.image.dim().0, rng);
        self.patch_at(start, config.size, &augmentation, maps)
    }

    /// The patch of `size` at `start`, augmented by `augmentation`, with `maps`.
    pub fn patch_at(
        &self,
        start: [usize; 3],
        size: [usize; 3],
        augmentation: &Augmentation,
        maps: &PatchMaps,
    ) -> Result<Patch> {
        let (_, nz, ny, nx) = self.image.dim();
        if (0..3).any(|a| start[a] + size[a] > [nz, ny, nx][a]) {
            return Err(DataError::Invalid(format!(
                "patch {size:?} at {start:?} leaves the volume {:?}",
                [nz, ny, nx]
            )));
        }
        let halo = maps
            .contour
            .map_or(0, |c| c.erosion.reach())
            .max(maps.skeleton.unwrap_or(0));
        let mut w = if augmentation.volumetric() {
            self.resampled(start, size, halo, augmentation)
        } else {
            let mut w = self.widened(start, size, [halo; 3]);
            let centre = std::array::from_fn(|a| w.inner[a] as f64 + (size[a] as f64 - 1.0) / 2.0);
            let mut travelling: Vec<&mut Array3<f32>> = w.weights.iter_mut().collect();
            augmentation.resample(&mut w.image, &mut w.label, &mut travelling, centre);
            w
        };
        {
            let mut travelling: Vec<&mut Array3<f32>> = w.weights.iter_mut().collect();
            augmentation.reflect(&mut w.image, &mut w.label, &mut travelling);
        }
        for (axis, reversed) in augmentation.reversed_axes().into_iter().enumerate() {
            if reversed {
                // the crop's mirror image inside the reversed widened arrays
                w.inner[axis] = w.label.shape()[axis] - w.inner[axis] - size[axis];
            }
        }
        let contour = match &maps.contour {
            Some(spec) => Some(maps.contour_of(spec, &w.label)?),
            None => None,
        };
        let skeleton = match maps.skeleton {
            Some(halo) => Some(skeleton_of(&w.label, w.inner, size, halo)?),
            None => None,
        };
        let [z, y, x] = w.inner;
        let (z1, y1, x1) = (z + size[0], y + size[1], x + size[2]);
        let crop3 = |a: &Array3<u8>| a.slice(s![z..z1, y..y1, x..x1]).to_owned();
        let mut image = w.image.slice(s![.., z..z1, y..y1, x..x1]).to_owned();
        augmentation.apply_intensity(&mut image);
        Ok(Patch {
            image,
            label: crop3(&w.label),
            contour: contour.as_ref().map(crop3),
            skeleton,
            weights: w
                .weights
                .map(|m| m.slice(s![z..z1, y..y1, x..x1]).to_owned()),
        })
    }

    fn fits(&self, size: [usize; 3]) -> bool {
        let (_, nz, ny, nx) = self.image.dim();
        size[0] <= nz && size[1] <= ny && size[2] <= nx
    }

    /// The bounds `[lo, hi)` of the crop `start .. start + size` widened by `halo[a]` voxels
    /// per side along axis `a`, clipped at the volume's edges.
    fn bounds(&self, start: [usize; 3], size: [usize; 3], halo: [usize; 3]) -> [[usize; 3]; 2] {
        let (_, nz, ny, nx) = self.image.dim();
        let n = [nz, ny, nx];
        [
            std::array::from_fn(|a| start[a].saturating_sub(halo[a])),
            std::array::from_fn(|a| (start[a] + size[a] + halo[a]).min(n[a])),
        ]
    }

    /// The crop `start .. start + size` widened by `halo[a]` voxels per side along axis `a`,
    /// clipped at the volume's edges.
    fn widened(&self, start: [usize; 3], size: [usize; 3], halo: [usize; 3]) -> Widened {
        let [lo, hi] = self.bounds(start, size, halo);
        let region = s![lo[0]..hi[0], lo[1]..hi[1], lo[2]..hi[2]];
        Widened {
            image: self
                .image
                .slice(s![.., lo[0]..hi[0], lo[1]..hi[1], lo[2]..hi[2]])
                .to_owned(),
            label: self.label.slice(region).to_owned(),
            weights: self.weights.as_ref().map(|w| w.slice(region).to_owned()),
            inner: std::array::from_fn(|a| start[a] - lo[a]),
        }
    }

    /// The crop widened by `halo` ([`SamplingVolume::widened`]) resampled by the volumetric
    /// `augmentation` about the crop's centre, read from a crop widened further by the
    /// augmentation's [`Augmentation::reach`] (so that it reads the volume, not clamped edges,
    /// wherever the volume has voxels).
    fn resampled(
        &self,
        start: [usize; 3],
        size: [usize; 3],
        halo: usize,
        augmentation: &Augmentation,
    ) -> Widened {
        let reach = augmentation.reach(size.map(|s| s + 2 * halo));
        let source = self.widened(start, size, std::array::from_fn(|a| halo + reach[a]));
        let [lo, hi] = self.bounds(start, size, [halo; 3]);
        let shape: [usize; 3] = std::array::from_fn(|a| hi[a] - lo[a]);
        // target index o is source index o + (lo − source's lo)
        let shift = std::array::from_fn(|a| (lo[a] + source.inner[a] - start[a]) as f64);
        let centre = std::array::from_fn(|a| source.inner[a] as f64 + (size[a] as f64 - 1.0) / 2.0);
        let map = shift_map(&augmentation.index_map(centre), shift);
        let mut image = Array4::zeros((source.image.dim().0, shape[0], shape[1], shape[2]));
        for (mut out, channel) in image
            .axis_iter_mut(Axis(0))
            .zip(source.image.axis_iter(Axis(0)))
        {
            out.assign(&sample(channel, shape, &map, Interpolation::Linear));
        }
        Widened {
            image,
            label: sample(source.label.view(), shape, &map, Interpolation::Nearest),
            weights: source
                .weights
                .map(|w| sample(w.view(), shape, &map, Interpolation::Nearest)),
            inner: std::array::from_fn(|a| start[a] - lo[a]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::Augmentation;

    /// Two crossing tubes (classes 1 and 2) through a 20 × 24 × 28 volume.
    fn volume() -> SamplingVolume {
        let label = Array3::from_shape_fn((20, 24, 28), |(z, y, x)| {
            let (fz, fy) = (z as f64 - 9.5, y as f64 - 11.5);
            if fz * fz + fy * fy <= 9.0 {
                1
            } else if (x as f64 - 13.0).powi(2) + fz * fz <= 4.0 {
                2
            } else {
                0
            }
        });
        let image = label.mapv(f32::from).insert_axis(Axis(0));
        SamplingVolume::new(image, label, [8, 10, 12]).expect("volume")
    }

    fn patch(volume: &SamplingVolume, start: [usize; 3], maps: &PatchMaps) -> Patch {
        volume
            .patch_at(start, [8, 10, 12], &Augmentation::identity(), maps)
            .expect("patch")
    }

    #[test]
    fn skeleton_maps_are_the_widened_crops_skeletons_cropped() {
        let volume = volume();
        let whole = tubed_skeleton(volume.label().view()).expect("whole");
        let start = [6, 7, 9];
        let crop = |a: &Array3<u8>| a.slice(s![6..14, 7..17, 9..21]).to_owned();
        // a halo reaching every edge: the whole volume's map, cropped
        let maps = PatchMaps {
            skeleton: Some(40),
            ..PatchMaps::default()
        };
        assert_eq!(patch(&volume, start, &maps).skeleton, Some(crop(&whole)));
        // no halo: the patch's own skeleton (the reference's)
        let own = PatchMaps {
            skeleton: Some(0),
            ..PatchMaps::default()
        };
        let p = patch(&volume, start, &own);
        assert_eq!(
            p.skeleton,
            Some(tubed_skeleton(p.label.view()).expect("own"))
        );
        // a contour halo larger than the skeleton's leaves the skeleton's own halo in force
        let h = 2;
        let widened = volume.label().slice(s![4..16, 5..19, 7..23]).to_owned();
        let want = tubed_skeleton(widened.view()).expect("widened");
        let both = PatchMaps {
            contour: Some(ContourSpec::default()),
            skeleton: Some(h),
            ..PatchMaps::default()
        };
        let p = patch(&volume, start, &both);
        assert_eq!(
            p.skeleton,
            Some(want.slice(s![2..10, 2..12, 2..14]).to_owned())
        );
        assert!(p.contour.is_some());
        // tube voxels carry the class of their voxel
        let skeleton = p.skeleton.expect("skeleton");
        assert!(
            skeleton
                .iter()
                .zip(&p.label)
                .all(|(&s, &l)| s == 0 || s == l)
        );
        assert!(skeleton.iter().any(|&s| s == 1) && skeleton.iter().any(|&s| s == 2));
        assert_eq!(patch(&volume, start, &PatchMaps::default()).skeleton, None);
    }
}
