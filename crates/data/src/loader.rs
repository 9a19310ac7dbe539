//! Background patch loading: worker threads sample and augment patches into bounded queues;
//! batches come out in a fixed order whatever the thread timing, so a seed fixes the run.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use ndarray::{Array3, Array4, Array5, ArrayView, Axis, Dimension, stack};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::error::{DataError, Result};
use crate::sampling::{PatchMaps, SamplerConfig, SamplingVolume};

/// A batch: images `(N, C, D, H, W)`, labels `(N, D, H, W)` and the maps the loader made.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The images.
    pub image: Array5<f32>,
    /// The class indices.
    pub label: Array4<u8>,
    /// Contour maps `(N, D, H, W)`, 1 = contour ([`PatchMaps::contour`]).
    pub contour: Option<Array4<u8>>,
    /// Tubed skeletons `(N, D, H, W)`, class indices, 0 off the tube ([`PatchMaps::skeleton`]).
    pub skeleton: Option<Array4<u8>>,
    /// Voxel weights `(N, D, H, W)` cropped from the volumes' own
    /// ([`SamplingVolume::with_weights`]).
    pub weights: Option<Array4<f32>>,
}

impl Batch {
    /// The batch's targets at `1/f_a` of its size along each axis `a` (`factors` `[z, y, x]`),
    /// for deep supervision (nnU-Net): labels, tubed skeletons and voxel weights by nearest
    /// neighbour (the first voxel of every `f_z × f_y × f_x` block, as
    /// `torch.nn.functional.interpolate(mode="nearest")` for whole factors), contour maps by
    /// max pooling (a bitwise or: region maps packed as bits stay packed); the image is left
    /// empty. Sizes are `⌊n_a / f_a⌋`.
    pub fn downsampled(&self, factors: [usize; 3]) -> Batch {
        let [fz, fy, fx] = factors.map(|f| f.max(1));
        let (n, d, h, w) = self.label.dim();
        let (d, h, w) = (d / fz, h / fy, w / fx);
        let strided = ndarray::s![
            ..,
            ..d * fz;fz as isize,
            ..h * fy;fy as isize,
            ..w * fx;fx as isize
        ];
        let pooled = |map: &Array4<u8>| {
            Array4::from_shape_fn((n, d, h, w), |(i, z, y, x)| {
                let block = map.slice(ndarray::s![
                    i,
                    z * fz..(z + 1) * fz,
                    y * fy..(y + 1) * fy,
                    x * fx..(x + 1) * fx
                ]);
                block.fold(0u8, |acc, &v| acc | v)
            })
        };
        Batch {
            image: Array5::zeros((n, 0, 0, 0, 0)),
            label: self.label.slice(strided).to_owned(),
            contour: self.contour.as_ref().map(pooled),
            skeleton: self.skeleton.as_ref().map(|m| m.slice(strided).to_owned()),
            weights: self.weights.as_ref().map(|m| m.slice(strided).to_owned()),
        }
    }
}

#[cfg(feature = "candle")]
impl Batch {
    /// The batch as candle tensors on `device`: image f32 `(N, C, D, H, W)`, labels u8
    /// `(N, D, H, W)`.
    pub fn to_tensors(
        &self,
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let image = candle_core::Tensor::from_slice(
            self.image.as_standard_layout().as_slice().unwrap_or(&[]),
            self.image.shape(),
            device,
        )?;
        Ok((image, self.label_tensor(device)?))
    }

    /// The labels as a u8 tensor `(N, D, H, W)` on `device`.
    pub fn label_tensor(&self, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        to_tensor(&self.label, device)
    }

    /// The contour maps as a u8 tensor `(N, D, H, W)` on `device`, if the batch has them.
    pub fn contour_tensor(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<candle_core::Tensor>> {
        self.contour
            .as_ref()
            .map(|c| to_tensor(c, device))
            .transpose()
    }

    /// The tubed skeletons as a u8 tensor `(N, D, H, W)` on `device` (class indices), if the
    /// batch has them.
    pub fn skeleton_tensor(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<candle_core::Tensor>> {
        self.skeleton
            .as_ref()
            .map(|s| to_tensor(s, device))
            .transpose()
    }

    /// Region contour maps packed as bits ([`PatchMaps::regions`]) unpacked into a u8 tensor
    /// `(N, J, D, H, W)` on `device` (1 = contour of region `j`), if the batch has them.
    pub fn region_contour_tensor(
        &self,
        regions: usize,
        device: &candle_core::Device,
    ) -> Result<Option<candle_core::Tensor>> {
        let Some(packed) = &self.contour else {
            return Ok(None);
        };
        let (n, d, h, w) = packed.dim();
        let unpacked = ndarray::Array5::from_shape_fn((n, regions, d, h, w), |(i, j, z, y, x)| {
            (packed[[i, z, y, x]] >> j) & 1
        });
        Ok(Some(to_tensor(&unpacked, device)?))
    }

    /// The voxel weights as an f32 tensor `(N, D, H, W)` on `device`, if the batch has them.
    pub fn weights_tensor(
        &self,
        device: &candle_core::Device,
    ) -> Result<Option<candle_core::Tensor>> {
        self.weights
            .as_ref()
            .map(|w| to_tensor(w, device))
            .transpose()
    }
}

#[cfg(feature = "candle")]
fn to_tensor<T: candle_core::WithDType, D: Dimension>(
    a: &ndarray::Array<T, D>,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    Ok(candle_core::Tensor::from_slice(
        a.as_standard_layout().as_slice().unwrap_or(&[]),
        a.shape(),
        device,
    )?)
}

/// What the loader draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Patches per batch.
    pub batch_size: usize,
    /// Batches per epoch.
    pub batches_per_epoch: usize,
    /// Worker threads.
    pub workers: usize,
    /// Batches each worker may hold ready.
    pub prefetch: usize,
    /// Patch sampling.
    pub sampler: SamplerConfig,
    /// Augmentation.
    pub augment: AugmentConfig,
    /// The maps made with each patch.
    #[serde(skip)]
    pub maps: PatchMaps,
    /// Which parts of each batch this loader draws (data-parallel ranks each draw theirs).
    #[serde(skip)]
    pub parts: BatchParts,
}

/// A batch of `batch_size` patches is drawn as `count` equal parts, part `p` from the batch's
/// random stream number `p` (part 0 of 1 is the batch's whole stream: the same patches as
/// without parts). A loader draws parts `first..first + take` only, so data-parallel ranks each
/// draw their own, and the union over ranks is the batch of one process drawing every part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchParts {
    /// Parts per batch (divides the batch size).
    pub count: usize,
    /// The first part drawn.
    pub first: usize,
    /// Parts drawn.
    pub take: usize,
}

impl Default for BatchParts {
    fn default() -> Self {
        BatchParts {
            count: 1,
            first: 0,
            take: 1,
        }
    }
}

impl BatchParts {
    /// Every part of a batch drawn as `count` parts.
    pub fn all(count: usize) -> Self {
        BatchParts {
            count,
            first: 0,
            take: count,
        }
    }

    /// The parts of rank `rank` of `ranks` (`ranks` divides `count`): `count / ranks`
    /// consecutive parts.
    pub fn of_rank(count: usize, rank: usize, ranks: usize) -> Self {
        let take = count / ranks.max(1);
        BatchParts {
            count,
            first: rank * take,
            take,
        }
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 2,
            batches_per_epoch: 50,
            workers: 2,
            prefetch: 2,
            sampler: SamplerConfig::default(),
            augment: AugmentConfig::default(),
            maps: PatchMaps::default(),
            parts: BatchParts::default(),
        }
    }
}

/// The seed of batch `batch` of epoch `epoch` (SplitMix64 of the three).
fn batch_seed(seed: u64, epoch: u64, batch: u64) -> u64 {
    let mut z = seed
        ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ batch.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Draws batch `batch` of `epoch` (the loader's [`BatchParts`] of it): each patch from a
/// uniformly chosen volume, sampled, augmented and given its maps with its part's random
/// stream.
pub fn draw_batch(
    volumes: &[SamplingVolume],
    config: &LoaderConfig,
    seed: u64,
    epoch: u64,
    batch: u64,
) -> Result<Batch> {
    if volumes.is_empty() || config.batch_size == 0 {
        return Err(DataError::Invalid(
            "a batch needs at least one volume and a batch size of at least 1".into(),
        ));
    }
    let parts = config.parts;
    if parts.count == 0
        || !config.batch_size.is_multiple_of(parts.count)
        || parts.first + parts.take > parts.count
    {
        return Err(DataError::Invalid(format!(
            "parts {}..{} of {}: the parts must divide the batch size {} and lie in 0..{}",
            parts.first,
            parts.first + parts.take,
            parts.count,
            config.batch_size,
            parts.count
        )));
    }
    let per_part = config.batch_size / parts.count;
    let mut patches = Vec::with_capacity(per_part * parts.take);
    for part in parts.first..parts.first + parts.take {
        let mut rng = ChaCha8Rng::seed_from_u64(batch_seed(seed, epoch, batch));
        rng.set_stream(part as u64);
        for _ in 0..per_part {
            let volume = &volumes[rng.random_range(0..volumes.len())];
            patches.push(volume.sample_patch(
                &config.sampler,
                &config.augment,
                &config.maps,
                &mut rng,
            )?);
        }
    }
    let contour = stack_all(patches.iter().map(|p| p.contour.as_ref()))?;
    let skeleton = stack_all(patches.iter().map(|p| p.skeleton.as_ref()))?;
    let weights = stack_all(patches.iter().map(|p| p.weights.as_ref()))?;
    Ok(Batch {
        image: stack_views(patches.iter().map(|p| p.image.view()))?,
        label: stack_views(patches.iter().map(|p| p.label.view()))?,
        contour,
        skeleton,
        weights,
    })
}

fn stack_views<'a, T: Clone + 'a, D: Dimension + 'a>(
    views: impl Iterator<Item = ArrayView<'a, T, D>>,
) -> Result<ndarray::Array<T, D::Larger>> {
    let views: Vec<_> = views.collect();
    stack(Axis(0), &views).map_err(|e| DataError::Invalid(e.to_string()))
}

/// The maps of every patch stacked, or `None` when the patches have none.
fn stack_all<'a, T: Clone + 'a>(
    maps: impl Iterator<Item = Option<&'a Array3<T>>>,
) -> Result<Option<Array4<T>>> {
    let maps: Option<Vec<&Array3<T>>> = maps.collect();
    match maps {
        Some(m) if !m.is_empty() => Ok(Some(stack_views(m.into_iter().map(|a| a.view()))?)),
        _ => Ok(None),
    }
}

/// The batches of one epoch, produced by background threads. Dropping it stops the workers.
pub struct EpochLoader {
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
}

impl EpochLoader {
    /// Starts the workers for `epoch`: worker `w` draws batches `w, w + W, ...` into its own
    /// bounded queue, and the iterator takes them round-robin, so the order is fixed.
    pub fn new(
        volumes: Arc<Vec<SamplingVolume>>,
        config: LoaderConfig,
        seed: u64,
        epoch: u64,
    ) -> Self {
        Self::starting_at(volumes, config, seed, epoch, 0)
    }

    /// The batches `first..` of `epoch` (resuming an interrupted epoch): the same batches the
    /// full epoch would give from there on.
    pub fn starting_at(
        volumes: Arc<Vec<SamplingVolume>>,
        config: LoaderConfig,
        seed: u64,
        epoch: u64,
        first: usize,
    ) -> Self {
        let workers = config.workers.max(1).min(config.batches_per_epoch.max(1));
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for w in 0..workers {
            let (tx, rx) = sync_channel(config.prefetch.max(1));
            let volumes = Arc::clone(&volumes);
            let config = config.clone();
            handles.push(std::thread::spawn(move || {
                let mut b = first + w;
                while b < config.batches_per_epoch {
                    let batch = draw_batch(&volumes, &config, seed, epoch, b as u64);
                    if tx.send(batch).is_err() {
                        return;
                    }
                    b += workers;
                }
            }));
            receivers.push(rx);
        }
        EpochLoader {
            receivers,
            handles,
            next: 0,
            total: config.batches_per_epoch.saturating_sub(first),
        }
    }
}

impl Iterator for EpochLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(rx.recv().unwrap_or_else(|_| {
            Err(DataError::Invalid(
                "a loader worker stopped unexpectedly".into(),
            ))
        }))
    }
}

impl Drop for EpochLoader {
    fn drop(&mut self) {
        self.receivers.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Array4};

    #[test]
    fn downsampled_targets_take_each_blocks_first_label_and_or_its_maps() {
        // torch's interpolate(mode="nearest", scale 1/2) reads source index floor(2 i): the
        // first voxel of each 2³ block; a contour map keeps a block with any contour voxel
        let label = Array4::from_shape_fn((1, 4, 4, 4), |(_, z, y, x)| (z * 16 + y * 4 + x) as u8);
        let mut contour = Array4::<u8>::zeros((1, 4, 4, 4));
        contour[[0, 1, 1, 1]] = 0b01; // the last voxel of block (0, 0, 0)
        contour[[0, 2, 3, 0]] = 0b10; // inside block (1, 1, 0)
        contour[[0, 3, 2, 1]] = 0b01; // the same block: the bits or together
        let skeleton = &label % 3; // class indices, taken as the labels are
        let batch = Batch {
            image: Array5::zeros((1, 1, 4, 4, 4)),
            label,
            contour: Some(contour),
            skeleton: Some(skeleton),
            weights: Some(Array4::from_elem((1, 4, 4, 4), 2.5)),
        };
        let half = batch.downsampled([2; 3]);
        assert_eq!(half.label.dim(), (1, 2, 2, 2));
        assert_eq!(half.label[[0, 1, 0, 1]], 32 + 2);
        assert_eq!(half.label[[0, 0, 1, 1]], 8 + 2);
        let maps = half.contour.expect("maps");
        assert_eq!(maps[[0, 0, 0, 0]], 0b01);
        assert_eq!(maps[[0, 1, 1, 0]], 0b11);
        assert_eq!(maps.iter().filter(|&&m| m != 0).count(), 2);
        assert!(half.weights.expect("weights").iter().all(|&w| w == 2.5));
        assert_eq!(half.skeleton.expect("skeleton"), &half.label % 3);
        // per axis (an anisotropic DynUNet level): 1 along z, 2 along y and x
        let flat = batch.downsampled([1, 2, 2]);
        assert_eq!(flat.label.dim(), (1, 4, 2, 2));
        assert_eq!(flat.label[[0, 3, 1, 1]], 48 + 8 + 2);
        let maps = flat.contour.expect("maps");
        assert_eq!((maps[[0, 1, 0, 0]], maps[[0, 2, 1, 0]]), (0b01, 0b10));
        assert_eq!(maps.iter().filter(|&&m| m != 0).count(), 3);
    }

    fn volumes() -> Vec<SamplingVolume> {
        (0..3u8)
            .map(|v| {
                let label = Array3::from_shape_fn((12, 14, 16), |(z, y, x)| {
                    u8::from((z + y + x + v as usize).is_multiple_of(7)) * (1 + v % 2)
                });
                let image = Array4::from_shape_fn((1, 12, 14, 16), |(_, z, y, x)| {
                    (z * 31 + y * 7 + x + v as usize) as f32
                });
                SamplingVolume::new(image, label, [8, 8, 8]).expect("volume")
            })
            .collect()
    }

    fn config(batch_size: usize, parts: BatchParts) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            parts,
            sampler: SamplerConfig {
                size: [8, 8, 8],
                ..SamplerConfig::default()
            },
            ..LoaderConfig::default()
        }
    }

    /// One part is the batch's whole stream: the patches drawn before parts existed.
    #[test]
    fn one_part_draws_the_batch_stream() {
        let volumes = volumes();
        let config = config(4, BatchParts::default());
        let batch = draw_batch(&volumes, &config, 7, 2, 5).expect("batch");
        let mut rng = ChaCha8Rng::seed_from_u64(batch_seed(7, 2, 5));
        for n in 0..4 {
            let volume = &volumes[rng.random_range(0..volumes.len())];
            let patch = volume
                .sample_patch(&config.sampler, &config.augment, &config.maps, &mut rng)
                .expect("patch");
            assert_eq!(batch.image.index_axis(Axis(0), n), patch.image);
            assert_eq!(batch.label.index_axis(Axis(0), n), patch.label);
        }
    }

    /// The ranks' parts, stacked in rank order, are the batch of one loader drawing them all.
    #[test]
    fn ranks_draw_disjoint_parts_of_one_batch() {
        let volumes = volumes();
        for (count, ranks) in [(2, 2), (4, 2), (4, 4), (3, 1)] {
            let whole =
                draw_batch(&volumes, &config(12, BatchParts::all(count)), 3, 1, 0).expect("whole");
            let mut images = Vec::new();
            for rank in 0..ranks {
                let part = BatchParts::of_rank(count, rank, ranks);
                let batch = draw_batch(&volumes, &config(12, part), 3, 1, 0).expect("part");
                assert_eq!(batch.image.dim().0, 12 / ranks);
                images.push(batch.image);
            }
            let views: Vec<_> = images.iter().map(|a| a.view()).collect();
            assert_eq!(
                stack_concat(&views),
                whole.image,
                "{count} parts, {ranks} ranks"
            );
        }
        let parted = draw_batch(&volumes, &config(4, BatchParts::all(2)), 3, 1, 0).expect("2");
        let single = draw_batch(&volumes, &config(4, BatchParts::default()), 3, 1, 0).expect("1");
        assert_eq!(
            parted.image.index_axis(Axis(0), 0),
            single.image.index_axis(Axis(0), 0),
            "part 0 starts as the whole stream"
        );
        assert_ne!(parted.image, single.image, "part 1 has its own stream");
        let bad = draw_batch(&volumes, &config(4, BatchParts::all(3)), 3, 1, 0);
        assert!(bad.is_err_and(|e| e.to_string().contains("divide the batch size 4")));
    }

    fn stack_concat(views: &[ndarray::ArrayView5<f32>]) -> Array5<f32> {
        ndarray::concatenate(Axis(0), views).expect("same shapes")
    }
}
