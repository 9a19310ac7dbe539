//! The model card (`config.json` beside every `model.safetensors`): what prediction needs to
//! replay a run, with the weights' SHA-256; and [`load_model`], which checks both.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use cwseg_losses::LossConfig;
use cwseg_models::{ModelConfig, Network};
use serde::{Deserialize, Serialize};

use crate::config::ContourMaps;
use crate::postprocess::PostProcessing;
use crate::prepare::Preprocessing;
use crate::window::{Blend, SlidingWindow, WindowWeights};

/// What `predict` needs from a run: written as `config.json` beside every `model.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The cwseg version that wrote it.
    pub cwseg_version: String,
    /// The network.
    pub model: ModelConfig,
    /// The loss it was trained with (`None`: trained outside cwseg, see `origin`).
    pub loss: Option<LossConfig>,
    /// Class names, index = class.
    pub classes: Vec<String>,
    /// Stored label value of each class (written back by `predict`).
    pub label_values: Vec<u8>,
    /// Input channels, in order.
    pub modalities: Vec<String>,
    /// Preprocessing to replay.
    pub preprocessing: Preprocessing,
    /// Inference window.
    pub patch: [usize; 3],
    /// Inference overlap.
    pub overlap: f64,
    /// What overlapping windows blend (cards before this field: probabilities).
    #[serde(default)]
    pub blend: Blend,
    /// The window weights (cards before this field: Gaussian).
    #[serde(default)]
    pub window_weights: WindowWeights,
    /// Where the training patches' contour maps came from (cards written before this field
    /// existed were trained with per-patch maps).
    #[serde(default = "ContourMaps::legacy")]
    pub contour_maps: ContourMaps,
    /// What prediction does after the argmax, decided on the validation cases after training
    /// (`None`: not decided, or no validation cases).
    #[serde(default)]
    pub postprocessing: Option<PostProcessing>,
    /// SHA-256 of the `model.safetensors` beside it (hex); loading refuses a file that differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// The precision of its products it was trained in: convolutions, and on CUDA matrix
    /// products (cards before this field: f32).
    #[serde(default)]
    pub precision: cwseg_models::Precision,
    /// Region-based training: one sigmoid output per region, turned back into labels by the
    /// regions' class order (`None`: one softmax output per class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<crate::regions::RegionConfig>,
    /// Where weights trained elsewhere came from and how they were converted (`cwseg import`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl ModelCard {
    /// The network's outputs: one per region with regions, else one per class.
    pub fn outputs(&self) -> usize {
        self.regions
            .as_ref()
            .map_or(self.classes.len(), |r| r.labels.len())
    }

    /// The regions in class indices, when the network predicts regions.
    pub fn region_classes(&self) -> Result<Option<crate::regions::RegionClasses>> {
        self.regions
            .as_ref()
            .map(|r| r.to_classes(&self.label_values))
            .transpose()
    }

    /// The card's sliding-window settings with `overlap`.
    pub fn sliding_window(&self, overlap: f64) -> SlidingWindow {
        SlidingWindow {
            overlap,
            blend: self.blend,
            weights: self.window_weights,
            activation: Default::default(),
            mirror: false,
        }
        .with_regions(self.regions.is_some())
    }

    /// The card with the digest of the weights file `weights`.
    pub fn with_weights_digest(&self, weights: &Path) -> Result<ModelCard> {
        Ok(ModelCard {
            weights_sha256: Some(sha256_file(weights)?),
            ..self.clone()
        })
    }

    /// Refuses a `dir/model.safetensors` whose SHA-256 is not the card's (when it has one).
    pub fn verify_weights(&self, dir: &Path) -> Result<()> {
        let Some(expected) = &self.weights_sha256 else {
            return Ok(());
        };
        let path = dir.join("model.safetensors");
        let found = sha256_file(&path)?;
        if &found != expected {
            bail!(
                "{}: SHA-256 {found} is not the {expected} recorded in {} (a damaged or replaced weights file)",
                path.display(),
                dir.join("config.json").display()
            );
        }
        Ok(())
    }

    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<ModelCard> {
        let path = dir.join("config.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        ModelCard::parse(&text, &path)
    }

    /// A model card from the text of a `config.json` (`path` names it in errors): the JSON,
    /// then a normalisation that is valid and measured.
    pub fn parse(text: &str, path: &Path) -> Result<ModelCard> {
        let card: ModelCard = serde_json::from_str(text)
            .with_context(|| format!("{}: not a cwseg model config", path.display()))?;
        let normalization = card.preprocessing.normalization;
        normalization
            .validate()
            .with_context(|| format!("{}: preprocessing", path.display()))?;
        if normalization.needs_dataset_statistics() {
            bail!(
                "{}: preprocessing normalization nnunet_ct has no statistics; a trained model \
                 records clip_z_score with the training set's numbers",
                path.display()
            );
        }
        card.check_fields()
            .with_context(|| path.display().to_string())?;
        Ok(card)
    }

    /// Refuses fields that disagree with each other or with the network: one class name and
    /// one distinct label value per output of the network, one modality per input channel, a
    /// window the network takes, an overlap inference takes.
    fn check_fields(&self) -> Result<()> {
        let outputs = self.model.classes();
        let expected = self.outputs();
        if expected != outputs {
            bail!(
                "classes: {} {} for a network with {outputs} outputs",
                expected,
                if self.regions.is_some() {
                    "regions"
                } else {
                    "names"
                },
            );
        }
        if let Some(regions) = &self.regions {
            regions
                .validate(&self.label_values)
                .context("the card's regions")?;
        }
        if self.label_values.len() != self.classes.len() {
            bail!(
                "label_values: {} values for {} classes (one stored value per class)",
                self.label_values.len(),
                self.classes.len()
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(v) = self.label_values.iter().find(|&&v| !seen.insert(v)) {
            bail!("label_values: {v} stands for two classes (each class needs its own value)");
        }
        let inputs = self.model.in_channels();
        if self.modalities.len() != inputs {
            bail!(
                "modalities: {} names for a network with {inputs} input channels",
                self.modalities.len()
            );
        }
        let multiples = self.model.size_multiples();
        if (0..3).any(|a| self.patch[a] == 0 || !self.patch[a].is_multiple_of(multiples[a])) {
            bail!(
                "patch {:?}: each side must be a positive multiple of {multiples:?} (z, y, x) \
                 for this network",
                self.patch
            );
        }
        if let Some(spacing) = self.preprocessing.spacing
            && spacing.iter().any(|&s| !(s.is_finite() && s > 0.0))
        {
            bail!("preprocessing.spacing {spacing:?}: every side must be finite and positive (mm)");
        }
        if let Some(rule) = &self.postprocessing {
            for group in &rule.keep_largest {
                let classes = self.classes.len();
                if let Some(c) = group.classes.iter().find(|&&c| c as usize >= classes) {
                    bail!(
                        "postprocessing.keep_largest `{}`: class {c} is not one of the \
                         card's {classes} classes",
                        group.name
                    );
                }
            }
        }
        crate::window::check_overlap(self.overlap, "overlap")
    }
}

/// Loads a trained network from a run or model folder (`RUN/best`, else `RUN` itself).
pub fn load_model(path: &Path, device: &Device) -> Result<(Network, ModelCard, PathBuf)> {
    let dir = if path.join("best").join("model.safetensors").exists() {
        path.join("best")
    } else {
        path.to_path_buf()
    };
    if !dir.join("config.json").is_file() {
        bail!(
            "{}: neither a model folder (config.json and model.safetensors) nor a run folder \
             with a best/ checkpoint",
            path.display()
        );
    }
    let card = ModelCard::read(&dir)?;
    card.verify_weights(&dir)?;
    let network = card
        .model
        .load_for_inference(&dir.join("model.safetensors"), device)?;
    let field = format!("{}: patch", dir.join("config.json").display());
    network
        .check_size(card.patch)
        .with_context(|| field.clone())?;
    crate::memory::check_window(&network, card.patch, &field)?;
    Ok((network, card, dir))
}
