//! `cwseg predict` as a library: the cases of an input file or folder, the files each will be
//! written to (checked all together before any is written), and the pipeline that predicts them
//! with three stages at once — a thread reads and preprocesses the next case, the caller's
//! thread predicts, a third writes the previous labels (the network's operations keep both
//! cores busy only part of the time) — stopping at the first error after the cases before it
//! are written.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use cwseg_data::{Geometry, Image, LabelMap, ReadOptions, read_image, write_label};
use ndarray::Array4;

use crate::card::ModelCard;
use crate::ensemble::{Member, predict_ensemble};
use crate::predict::{PredictOptions, PreparedCase};
use crate::shard::Shard;

/// What to predict and where to write it.
#[derive(Debug, Clone)]
pub struct PredictFiles {
    /// A NIfTI image, a folder of images (nnU-Net channel files grouped), a BraTS folder or one
    /// BraTS case folder.
    pub input: PathBuf,
    /// The output file (one input file) or folder.
    pub output: PathBuf,
    /// Also write each case's class probabilities (`<output stem>_probabilities/`).
    pub probabilities: bool,
    /// Overlap and post-processing.
    pub options: PredictOptions,
    /// Only every N-th case from case I.
    pub shard: Option<Shard>,
    /// Folders no output may lie in (the model's).
    pub protected: Vec<PathBuf>,
}

/// One case to predict: its id, image files and label output.
#[derive(Debug, Clone)]
pub struct PlannedCase {
    /// The case id.
    pub id: String,
    /// Its image files, one per channel or one for all.
    pub files: Vec<PathBuf>,
    /// Where its labels go.
    pub output: PathBuf,
}

impl PredictFiles {
    /// The cases to predict (after the shard) and their outputs, every output checked before
    /// any is written: not an input, not another output, not in a protected folder; the output
    /// folder is created for a folder of inputs. Empty when the shard holds no case.
    pub fn plan(&self, card: &ModelCard, model_dir: &Path) -> Result<Vec<PlannedCase>> {
        if crate::outputs::same_place(&self.output, &self.input) {
            bail!(
                "--output {} is the input {}: it would be overwritten; choose another output",
                self.output.display(),
                self.input.display()
            );
        }
        let mut inputs = crate::inputs::case_files(
            &self.input,
            &card.modalities,
            &model_dir.join("config.json"),
        )?;
        let single = self.input.is_file();
        if let Some(shard) = self.shard {
            if single {
                bail!(
                    "--shard {shard} splits a folder of inputs; {} is one file",
                    self.input.display()
                );
            }
            inputs = shard.select(inputs);
            if inputs.is_empty() {
                return Ok(Vec::new());
            }
        }
        self.check_output_kind(single)?;
        let planned: Vec<PlannedCase> = inputs
            .into_iter()
            .map(|(id, files)| {
                let output = if single {
                    self.output.clone()
                } else {
                    self.output.join(format!("{id}.nii.gz"))
                };
                PlannedCase { id, files, output }
            })
            .collect();
        self.check_outputs(&planned)?;
        if !single {
            std::fs::create_dir_all(&self.output)
                .with_context(|| format!("creating {}", self.output.display()))?;
        }
        Ok(planned)
    }

    /// One input file gives one output file; a folder of inputs an output folder.
    fn check_output_kind(&self, single: bool) -> Result<()> {
        if single && self.output.is_dir() {
            bail!(
                "--output {} is a folder; one input file gives one output file",
                self.output.display()
            );
        }
        if !single && self.output.is_file() {
            bail!(
                "--output {} is a file; a folder of inputs needs an output folder",
                self.output.display()
            );
        }
        Ok(())
    }

    /// Checks every file and folder the plan will write before it writes any: no two cases
    /// (nor a case and its probabilities) share an output, no output is an input file, none
    /// lies inside the protected folders.
    fn check_outputs(&self, cases: &[PlannedCase]) -> Result<()> {
        let mut outputs = crate::outputs::Outputs::new();
        for case in cases {
            let source = if cases.len() == 1 {
                "--output".to_string()
            } else {
                format!("the case {} ({})", case.id, case.files[0].display())
            };
            outputs.add(&source, &case.output)?;
            if self.probabilities {
                outputs.add(
                    &format!("{source}'s probabilities"),
                    &probabilities_folder(&case.output),
                )?;
            }
        }
        let inputs: Vec<(&str, &Path)> = cases
            .iter()
            .flat_map(|c| c.files.iter().map(|f| ("image", f.as_path())))
            .collect();
        outputs.refuse_inputs(&inputs)?;
        for folder in &self.protected {
            outputs.refuse_inside(folder, "the model folder")?;
        }
        Ok(())
    }

    /// Predicts the planned cases with `members` (one model, or an ensemble whose
    /// probabilities are averaged: [`crate::ensemble`]) on `device`, calling `done` after each;
    /// returns the number written.
    pub fn run(
        &self,
        plan: Vec<PlannedCase>,
        members: &[Member],
        device: &Device,
        done: &mut dyn FnMut(),
    ) -> Result<usize> {
        let first = members.first().context("no model to predict with")?;
        let count = plan.len();
        std::thread::scope(|scope| -> Result<()> {
            let (cases, read) = std::sync::mpsc::sync_channel(1);
            let single = members.len() == 1;
            scope.spawn(move || {
                for case in plan {
                    let ready = read_case_image(&case.files, &first.card.modalities, &first.dir)
                        .and_then(|image| Ready::new(image, single.then_some(&first.card), &case));
                    if cases.send((case.output, ready)).is_err() {
                        break; // the predicting loop stopped on an error
                    }
                }
            });
            let mut writing: Option<std::thread::ScopedJoinHandle<'_, Result<()>>> = None;
            for (out, ready) in read {
                let (labels, probabilities) = self.predict(ready?, members, device)?;
                if let Some((probabilities, geometry)) = probabilities {
                    let folder = probabilities_folder(&out);
                    write_probabilities(&folder, &probabilities, &geometry, &first.card)?;
                }
                finish(writing.take())?;
                writing = Some(scope.spawn(move || Ok(write_label(&out, &labels)?)));
                done();
            }
            finish(writing)
        })?;
        Ok(count)
    }

    /// One case's labels, and its probabilities on the input's grid when asked for.
    fn predict(
        &self,
        ready: Ready,
        members: &[Member],
        device: &Device,
    ) -> Result<(LabelMap, Option<Probabilities>)> {
        match (ready, members) {
            (Ready::Prepared(geometry, prepared), [member]) => {
                let prediction =
                    prepared.predict(&member.network, &member.card, self.options, device)?;
                let probabilities = match self.probabilities {
                    true => Some(prediction.probabilities_on_input(&member.card, &geometry)?),
                    false => None,
                };
                let labels = LabelMap {
                    data: prediction.labels,
                    geometry: geometry.clone(),
                };
                Ok((labels, probabilities.map(|p| (p, geometry))))
            }
            (Ready::Prepared(..), _) | (Ready::Image(_), []) => {
                bail!("a case prepared for one model was given to another number of models")
            }
            (Ready::Image(image), members) => {
                let image = *image;
                let options = PredictOptions {
                    keep_probabilities: self.probabilities,
                    ..self.options
                };
                let prediction = predict_ensemble(members, &image, options, device)?;
                let probabilities = prediction
                    .probabilities
                    .map(|p| (p, image.geometry.clone()));
                let labels = LabelMap {
                    data: prediction.labels,
                    geometry: image.geometry,
                };
                Ok((labels, probabilities))
            }
        }
    }
}

/// A case's probabilities `[k, z, y, x]` on the input's grid, and that grid.
type Probabilities = (Array4<f32>, Geometry);

/// A case read and ready to predict: preprocessed for the one model, or the image for an
/// ensemble (each member preprocesses it its own way).
enum Ready {
    Prepared(Geometry, Box<PreparedCase>),
    Image(Box<Image>),
}

impl Ready {
    fn new(image: Image, card: Option<&ModelCard>, case: &PlannedCase) -> Result<Self> {
        let Some(card) = card else {
            return Ok(Ready::Image(Box::new(image)));
        };
        let prepared = PreparedCase::new(card, &image)
            .with_context(|| format!("{}: the model's preprocessing", case.files[0].display()))?;
        Ok(Ready::Prepared(image.geometry, Box::new(prepared)))
    }
}

/// The folder of an output's class probabilities: `<output stem>_probabilities/` beside it
/// (named after the output, so two outputs of one input never share it).
fn probabilities_folder(output: &Path) -> PathBuf {
    output.with_file_name(format!("{}_probabilities", crate::inputs::nii_stem(output)))
}

/// Writes `[k, z, y, x]` probabilities as one float NIfTI per output of `card`'s network,
/// each with the input's geometry: `dir/class_KK.nii.gz` (softmax, KK the class index), or for
/// a region model `dir/region_JJ.nii.gz` (region JJ's sigmoid, in the card's `regions.names`
/// order; was: `class_JJ`, read as classes). The folder is replaced whole (written beside it,
/// then renamed): no file of an earlier prediction stays, and a killed command leaves the old
/// set or the new one.
fn write_probabilities(
    dir: &Path,
    data: &Array4<f32>,
    geometry: &Geometry,
    card: &ModelCard,
) -> Result<()> {
    let prefix = match card.regions {
        Some(_) => "region",
        None => "class",
    };
    crate::checkpoint::replace(dir, |fresh| {
        for (k, channel) in data.outer_iter().enumerate() {
            cwseg_data::write_volume(
                fresh.join(format!("{prefix}_{k:02}.nii.gz")),
                &channel.to_owned(),
                geometry,
            )?;
        }
        Ok(())
    })
}

/// Waits for a writing thread, if any, and returns its result.
fn finish(writing: Option<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    match writing.map(|w| w.join()) {
        None => Ok(()),
        Some(Ok(result)) => result,
        Some(Err(_)) => bail!("writing a prediction panicked"),
    }
}

/// Reads a case's channel files into one image `[c, z, y, x]` (`stack_channels`: same shape
/// and affine), with as many channels as the model in `dir` has `modalities`.
fn read_case_image(files: &[PathBuf], modalities: &[String], dir: &Path) -> Result<Image> {
    let images = files
        .iter()
        .map(|f| read_image(f, &ReadOptions::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let image = cwseg_data::stack_channels(images, files)?;
    let channels = image.data.dim().0;
    if channels != modalities.len() {
        bail!(
            "{}: {channels} channels, the model {} expects {} ({})",
            files[0].display(),
            dir.display(),
            modalities.len(),
            modalities.join(", ")
        );
    }
    Ok(image)
}
