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
    /// Voxel weights `(N, D, H, W)` cropped from the volumes' own
    /// ([`SamplingVolume::with_weights`]).
    pub weights: Option<Array4<f32>>,
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
        let label = candle_core::Tensor::from_slice(
            self.label.as_standard_layout().as_slice().unwrap_or(&[]),
            self.label.shape(),
            device,
        )?;
        Ok((image, label))
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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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

/// Draws batch `batch` of `epoch`: each patch from a uniformly chosen volume, sampled,
/// augmented and given its maps with the batch's own random stream.
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
    let mut rng = ChaCha8Rng::seed_from_u64(batch_seed(seed, epoch, batch));
    let patches = (0..config.batch_size)
        .map(|_| {
            let volume = &volumes[rng.random_range(0..volumes.len())];
            volume.sample_patch(&config.sampler, &config.augment, &config.maps, &mut rng)
        })
        .collect::<Result<Vec<_>>>()?;
    let contour = stack_all(patches.iter().map(|p| p.contour.as_ref()))?;
    let weights = stack_all(patches.iter().map(|p| p.weights.as_ref()))?;
    Ok(Batch {
        image: stack_views(patches.iter().map(|p| p.image.view()))?,
        label: stack_views(patches.iter().map(|p| p.label.view()))?,
        contour,
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
