//! Sliding-window inference with a network: windows of the training patch size, Gaussian
//! blending, softmax probabilities.

use anyhow::{Context, Result, bail};
use candle_core::{Device, ModuleT, Tensor};
use cwseg_data::crop::pad_or_crop_channels;
use cwseg_data::resample::resample_image_to;
use cwseg_data::{Blender, BoundingBox, Geometry, Image, gaussian_importance, window_positions};
use cwseg_models::Network;
use ndarray::{Array3, Array4, ArrayView3, Axis, s};
use rayon::prelude::*;

use crate::card::ModelCard;
use crate::regions::decide;
use crate::window::{Activation, Blend, SlidingWindow, WindowWeights};

/// Class probabilities `[k, z, y, x]` of a preprocessed image `[c, z, y, x]`: windows of
/// `window` placed as MONAI's `dense_patch_slices` with `sliding.overlap`, `batch` windows per
/// network call, their probabilities (or logits, softmaxed after blending) averaged with the
/// window weights; volumes smaller than the window are padded (centred, zeros) and the
/// padding cut off again. With `sliding.mirror`, the mean of this over the 8 flips of the
/// image (every subset of the three spatial axes), each result flipped back.
pub fn predict_probabilities(
    network: &Network,
    image: &Array4<f32>,
    classes: usize,
    window: [usize; 3],
    sliding: SlidingWindow,
    batch: usize,
    device: &Device,
) -> Result<Array4<f32>> {
    if !sliding.mirror {
        return predict_once(network, image, classes, window, sliding, batch, device);
    }
    let mut sum: Option<Array4<f32>> = None;
    for flips in 0..8usize {
        let axes: Vec<usize> = (0..3).filter(|a| flips & (1 << a) != 0).collect();
        let flipped = flip_spatial(image.view(), &axes);
        let probs = predict_once(network, &flipped, classes, window, sliding, batch, device)?;
        let back = flip_spatial(probs.view(), &axes);
        match &mut sum {
            None => sum = Some(back),
            Some(s) => *s += &back,
        }
    }
    let mut mean = sum.context("no mirrored prediction")?;
    mean.mapv_inplace(|p| p / 8.0);
    Ok(mean)
}

/// `[c, z, y, x]` reversed along the spatial `axes` (0 = z), as a standard-layout copy.
fn flip_spatial(volume: ndarray::ArrayView4<f32>, axes: &[usize]) -> Array4<f32> {
    let mut view = volume;
    for &a in axes {
        view.invert_axis(Axis(a + 1));
    }
    view.as_standard_layout().into_owned()
}

/// [`predict_probabilities`] without mirroring.
fn predict_once(
    network: &Network,
    image: &Array4<f32>,
    classes: usize,
    window: [usize; 3],
    sliding: SlidingWindow,
    batch: usize,
    device: &Device,
) -> Result<Array4<f32>> {
    let (_, z, y, x) = image.dim();
    let padded_shape = [z.max(window[0]), y.max(window[1]), x.max(window[2])];
    let padded;
    let volume = if padded_shape != [z, y, x] {
        padded = pad_or_crop_channels(image.view(), padded_shape, 0.0);
        &padded
    } else {
        image
    };
    let positions = window_positions(padded_shape, window, sliding.overlap)?;
    let importance = match sliding.weights {
        WindowWeights::Gaussian => gaussian_importance(window, 0.125),
        WindowWeights::Constant => Array3::ones(window),
    };
    let mut blender = Blender::with_importance(classes, padded_shape, importance);
    let per = classes * window.iter().product::<usize>();
    // on the CPU the previous batch is blended while the network runs on this one (on a GPU
    // the network runs on this thread, whose context is bound, one after the other)
    let mut pending: Option<(&[[usize; 3]], Vec<f32>)> = None;
    for chunk in positions.chunks(batch.max(1)) {
        let input = window_batch(volume, chunk, window, device)?;
        let forward = || network.forward_t(&input, false);
        let (logits, blended) = if device.is_cpu() {
            rayon::join(forward, || {
                blend(&mut blender, pending.take(), classes, window)
            })
        } else {
            let blended = blend(&mut blender, pending.take(), classes, window);
            (forward(), blended)
        };
        let (logits, ()) = (logits?, blended?);
        if logits.dim(1)? != classes {
            bail!(
                "the network gives {} classes, {classes} expected",
                logits.dim(1)?
            );
        }
        let mut scores: Vec<f32> = logits.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        if sliding.blend == Blend::Probabilities {
            scores
                .par_chunks_mut(per)
                .for_each(|w| activate(w, classes, sliding.activation));
        }
        pending = Some((chunk, scores));
    }
    blend(&mut blender, pending, classes, window)?;
    let mut full = blender.finish();
    if sliding.blend == Blend::Logits {
        let flat = full
            .as_slice_mut()
            .context("the blended scores are not contiguous")?;
        activate(flat, classes, sliding.activation);
    }
    if padded_shape == [z, y, x] {
        return Ok(full);
    }
    // undo the centred padding
    let start: [usize; 3] = std::array::from_fn(|a| (padded_shape[a] - [z, y, x][a]) / 2);
    let out = full
        .slice(s![
            ..,
            start[0]..start[0] + z,
            start[1]..start[1] + y,
            start[2]..start[2] + x
        ])
        .to_owned();
    Ok(out)
}

/// The windows of `volume` at `positions` as one input batch `(B, C, window)`.
fn window_batch(
    volume: &Array4<f32>,
    positions: &[[usize; 3]],
    window: [usize; 3],
    device: &Device,
) -> Result<Tensor> {
    let c = volume.dim().0;
    let mut data = Vec::with_capacity(positions.len() * c * window.iter().product::<usize>());
    for p in positions {
        let w = volume.slice(s![
            ..,
            p[0]..p[0] + window[0],
            p[1]..p[1] + window[1],
            p[2]..p[2] + window[2]
        ]);
        data.extend(w.iter().copied());
    }
    let shape = (positions.len(), c, window[0], window[1], window[2]);
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Adds a batch's window scores `[B, k, window]` (flat) at their positions, if there is one.
fn blend(
    blender: &mut Blender,
    batch: Option<(&[[usize; 3]], Vec<f32>)>,
    classes: usize,
    window: [usize; 3],
) -> Result<()> {
    let Some((positions, scores)) = batch else {
        return Ok(());
    };
    let shape = (classes, window[0], window[1], window[2]);
    for (p, w) in positions
        .iter()
        .zip(scores.chunks(classes * window.iter().product::<usize>()))
    {
        blender.add(*p, ndarray::ArrayView4::from_shape(shape, w)?)?;
    }
    Ok(())
}

/// Probabilities from one window's scores `[k, S]` (flat), in place: a softmax over the
/// classes, or a sigmoid `1 / (1 + e^{−z})` per output.
fn activate(scores: &mut [f32], classes: usize, activation: Activation) {
    match activation {
        Activation::Softmax => softmax_planes(scores, classes),
        Activation::Sigmoid => scores
            .iter_mut()
            .for_each(|z| *z = 1.0 / (1.0 + (-*z).exp())),
    }
}

/// Softmax over the classes of one window's scores `[k, S]` (flat), in place.
fn softmax_planes(scores: &mut [f32], classes: usize) {
    let volume = scores.len() / classes;
    let mut max = scores[..volume].to_vec();
    for plane in scores.chunks(volume).skip(1) {
        max.iter_mut().zip(plane).for_each(|(m, &v)| *m = m.max(v));
    }
    let mut sum = vec![0f32; volume];
    for plane in scores.chunks_mut(volume) {
        for ((v, m), s) in plane.iter_mut().zip(&max).zip(&mut sum) {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    for plane in scores.chunks_mut(volume) {
        plane.iter_mut().zip(&sum).for_each(|(v, s)| *v /= s);
    }
}

/// A prediction of one case on the input's grid, with the probabilities on the network's grid
/// and what is needed to map them back.
pub struct CasePrediction {
    /// Stored label values on the input's grid (preprocessing inverted).
    pub labels: Array3<u8>,
    /// The same before the card's post-processing, when it was applied.
    pub unprocessed: Option<Array3<u8>>,
    /// Class probabilities `[k, z, y, x]` on the preprocessed grid.
    pub probabilities: Array4<f32>,
    /// The preprocessed grid.
    pub preprocessed: Geometry,
    /// The input's grid cropped to the preprocessing's box (the whole input without a crop).
    pub cropped: Geometry,
    /// Where the cropped grid starts in the input's voxels.
    pub start: [usize; 3],
    /// The probabilities on the input's grid, in the canonical orientation when the card
    /// reorients, when the prediction was asked to keep them.
    kept: Option<Array4<f32>>,
}

impl CasePrediction {
    /// The class probabilities `[k, z, y, x]` on the input's grid `input` (the one the
    /// prediction was made from): resampled back to the input's spacing, background
    /// (probability 1 of class 0) outside the preprocessing's crop, and taken back from the
    /// canonical orientation when the card reorients.
    pub fn probabilities_on_input(
        &self,
        card: &ModelCard,
        input: &Geometry,
    ) -> Result<Array4<f32>> {
        if let Some(kept) = &self.kept {
            let channels: Vec<Array3<f32>> = kept
                .outer_iter()
                .map(|c| to_input_orientation(card, input, c.to_owned()))
                .collect();
            let views: Vec<_> = channels.iter().map(|c| c.view()).collect();
            return Ok(ndarray::stack(Axis(0), &views)?);
        }
        let channels = self
            .probabilities
            .outer_iter()
            .enumerate()
            .map(|(k, channel)| {
                let canonical = self.channel_on_canonical(card, input, k, channel)?;
                Ok(to_input_orientation(card, input, canonical))
            })
            .collect::<Result<Vec<_>>>()?;
        let views: Vec<_> = channels.iter().map(|c| c.view()).collect();
        Ok(ndarray::stack(Axis(0), &views)?)
    }

    /// The argmax over classes of the probabilities resampled to the input's spacing, on the
    /// input's grid in the canonical orientation when the card reorients (else as it is), one
    /// channel at a time (a running maximum: one volume of probabilities in memory, not one
    /// per class); the first class wins ties, as [`cwseg_data::argmax`].
    fn argmax_on_canonical(&self, card: &ModelCard, input: &Geometry) -> Result<Array3<u8>> {
        let mut best: Option<(Array3<f32>, Array3<u8>)> = None;
        for (k, channel) in self.probabilities.outer_iter().enumerate() {
            let p = self.channel_on_canonical(card, input, k, channel)?;
            match &mut best {
                None => {
                    let index = Array3::zeros(p.dim());
                    best = Some((p, index));
                }
                Some((max, index)) => {
                    ndarray::Zip::from(max)
                        .and(index)
                        .and(&p)
                        .for_each(|m, i, &v| {
                            if v > *m {
                                *m = v;
                                *i = k as u8;
                            }
                        });
                }
            }
        }
        Ok(best.map_or_else(
            || Array3::zeros(canonical_grid(card, input).shape()),
            |b| b.1,
        ))
    }

    /// Class `k`'s probabilities resampled to the input's spacing (when the card resamples)
    /// and placed in the input's grid (background outside the crop), in the canonical
    /// orientation when the card reorients.
    fn channel_on_canonical(
        &self,
        card: &ModelCard,
        input: &Geometry,
        k: usize,
        channel: ArrayView3<f32>,
    ) -> Result<Array3<f32>> {
        let back = if card.preprocessing.spacing.is_some() {
            let image = Image {
                data: channel.to_owned().insert_axis(Axis(0)),
                geometry: self.preprocessed.clone(),
            };
            resample_image_to(&image, &self.cropped)?
                .data
                .index_axis_move(Axis(0), 0)
        } else {
            channel.to_owned()
        };
        // outside the crop: class 0 certain, or no region
        let background = if k == 0 && card.regions.is_none() {
            1.0
        } else {
            0.0
        };
        Ok(self.placed(canonical_grid(card, input).shape(), back, background))
    }

    /// `part` (the crop's size) placed at the crop's start in a volume of `shape` filled with
    /// `fill`.
    fn placed<T: Clone>(&self, shape: [usize; 3], part: Array3<T>, fill: T) -> Array3<T> {
        let mut full = Array3::from_elem(shape, fill);
        let [dz, dy, dx] = self.cropped.shape();
        let start = self.start;
        full.slice_mut(s![
            start[0]..start[0] + dz,
            start[1]..start[1] + dy,
            start[2]..start[2] + dx
        ])
        .assign(&part);
        full
    }
}

/// The grid the crop and the resampling refer to: the input's, in the canonical orientation
/// when the card reorients.
fn canonical_grid(card: &ModelCard, input: &Geometry) -> Geometry {
    if card.preprocessing.reorient {
        input.to_canonical()
    } else {
        input.clone()
    }
}

/// A volume on [`canonical_grid`] turned to the input's own orientation.
fn to_input_orientation<T: Clone>(
    card: &ModelCard,
    input: &Geometry,
    data: Array3<T>,
) -> Array3<T> {
    if card.preprocessing.reorient {
        cwseg_data::from_canonical(&data, input)
    } else {
        data
    }
}

/// How a case is predicted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictOptions {
    /// Sliding-window overlap.
    pub overlap: f64,
    /// Apply the model card's post-processing (if it has one).
    pub postprocess: bool,
    /// Test-time mirroring: the mean of the 8 flips' probabilities (nnU-Net's default).
    pub mirror: bool,
    /// Keep the class probabilities on the input's grid, which the labels are the argmax of
    /// ([`CasePrediction::probabilities_on_input`] then returns them instead of resampling every
    /// class again).
    pub keep_probabilities: bool,
}

/// Predicts an image `[c, z, y, x]` on its own grid: the model card's preprocessing, sliding
/// windows, argmax, the card's post-processing, then back through the resampling, the crop and
/// the reorientation, class indices mapped to the stored label values; voxels outside the crop
/// are background. [`PreparedCase::new`] then [`PreparedCase::predict`].
pub fn predict_case(
    network: &Network,
    card: &ModelCard,
    image: &Image,
    options: PredictOptions,
    device: &Device,
) -> Result<CasePrediction> {
    PreparedCase::new(card, image)?.predict(network, card, options, device)
}

/// An input image with the model card's preprocessing applied: the part of [`predict_case`]
/// that needs no network, so that a pipeline can prepare the next case while one is predicted.
pub struct PreparedCase {
    /// The input's grid.
    input: Geometry,
    /// The preprocessed image.
    pre: Image,
    /// The foreground crop, when the preprocessing crops.
    bbox: Option<BoundingBox>,
}

impl PreparedCase {
    /// Applies `card`'s preprocessing to `image`.
    pub fn new(card: &ModelCard, image: &Image) -> Result<Self> {
        let (pre, _, bbox) = card.preprocessing.apply(image, None)?;
        Ok(PreparedCase {
            input: image.geometry.clone(),
            pre,
            bbox,
        })
    }

    /// The rest of [`predict_case`] for the image this was prepared from.
    pub fn predict(
        self,
        network: &Network,
        card: &ModelCard,
        options: PredictOptions,
        device: &Device,
    ) -> Result<CasePrediction> {
        let PreparedCase { input, pre, bbox } = self;
        let probabilities = predict_probabilities(
            network,
            &pre.data,
            card.outputs(),
            card.patch,
            SlidingWindow {
                mirror: options.mirror,
                ..card.sliding_window(options.overlap)
            },
            2,
            device,
        )?;
        // the grid the crop and resampling refer to: the input's, reoriented when the card says so
        let reoriented = card.preprocessing.reorient.then(|| input.to_canonical());
        let geometry = reoriented.as_ref().unwrap_or(&input);
        let cropped = match &bbox {
            Some(b) => geometry.crop(b.start, b.shape()),
            None => geometry.clone(),
        };
        let mut prediction = CasePrediction {
            labels: Array3::zeros(input.shape()),
            unprocessed: None,
            probabilities,
            preprocessed: pre.geometry,
            cropped,
            start: bbox.map_or([0; 3], |b| b.start),
            kept: None,
        };
        prediction.labels_on_input(card, &input, options)?;
        Ok(prediction)
    }
}

impl CasePrediction {
    /// Sets `labels` (and `unprocessed`): the argmax of the probabilities on the input's grid
    /// (with regions, their class order: [`crate::regions`]),
    /// post-processed, as stored label values. With resampling the probabilities are resampled
    /// first and the argmax taken at the input's spacing (nnU-Net's order), so the labels are the
    /// argmax of what `--probabilities` writes; otherwise the crop only moves voxels, and the
    /// argmax is taken before it. Post-processing runs in the canonical orientation when the
    /// card reorients, so that an input's orientation cannot change which component is kept.
    fn labels_on_input(
        &mut self,
        card: &ModelCard,
        input: &Geometry,
        options: PredictOptions,
    ) -> Result<()> {
        let regions = card.region_classes()?;
        let resampled = card.preprocessing.spacing.is_some();
        let classes = if resampled && (options.keep_probabilities || regions.is_some()) {
            let channels = self
                .probabilities
                .outer_iter()
                .enumerate()
                .map(|(k, c)| self.channel_on_canonical(card, input, k, c))
                .collect::<Result<Vec<_>>>()?;
            let views: Vec<_> = channels.iter().map(|c| c.view()).collect();
            let kept = ndarray::stack(Axis(0), &views)?;
            let classes = decide(kept.view(), regions.as_ref());
            if options.keep_probabilities {
                self.kept = Some(kept);
            }
            classes
        } else if resampled {
            self.argmax_on_canonical(card, input)?
        } else {
            let raw = decide(self.probabilities.view(), regions.as_ref());
            self.placed(canonical_grid(card, input).shape(), raw, 0)
        };
        let finish = |mut classes: Array3<u8>| {
            classes.mapv_inplace(|k| card.label_values.get(k as usize).copied().unwrap_or(k));
            to_input_orientation(card, input, classes)
        };
        match (options.postprocess, &card.postprocessing) {
            (true, Some(rule)) => {
                let mut processed = classes.clone();
                rule.apply(&mut processed);
                self.labels = finish(processed);
                self.unprocessed = Some(finish(classes));
            }
            _ => self.labels = finish(classes),
        }
        Ok(())
    }
}
