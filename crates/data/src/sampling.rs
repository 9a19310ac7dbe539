//! Patch sampling: random crops centred on foreground with a given positive/negative ratio
//! (MONAI's `RandCropByPosNegLabel`), optionally class-balanced so rare classes are seen.

use ndarray::{Array3, Array4, s};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::crop::{pad_or_crop, pad_or_crop_channels};
use crate::error::{DataError, Result};

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
    classes: Vec<Vec<u32>>,
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
            classes,
        })
    }

    /// The image.
    pub fn image(&self) -> &Array4<f32> {
        &self.image
    }

    /// The labels.
    pub fn label(&self) -> &Array3<u8> {
        &self.label
    }

    /// Draws one patch of `config.size` (padded with zeros where the volume is smaller).
    pub fn sample<R: Rng>(&self, config: &SamplerConfig, rng: &mut R) -> (Array4<f32>, Array3<u8>) {
        let (_, nz, ny, nx) = self.image.dim();
        if config.size[0] > nz || config.size[1] > ny || config.size[2] > nx {
            return (
                pad_or_crop_channels(self.image.view(), config.size, 0.0),
                pad_or_crop(self.label.view(), config.size, 0),
            );
        }
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
        let start: [usize; 3] = std::array::from_fn(|a| {
            centre[a]
                .saturating_sub(config.size[a] / 2)
                .min(n[a] - config.size[a])
        });
        let end: [usize; 3] = std::array::from_fn(|a| start[a] + config.size[a]);
        (
            self.image
                .slice(s![.., start[0]..end[0], start[1]..end[1], start[2]..end[2]])
                .to_owned(),
            self.label
                .slice(s![start[0]..end[0], start[1]..end[1], start[2]..end[2]])
                .to_owned(),
        )
    }
}
