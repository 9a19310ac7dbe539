//! `cwseg import monai` and `cwseg export --format monai`: model folders from and to MONAI's
//! V-Net and UNETR. The weights are converted between MONAI's `(x, y, z)` axis order and
//! cwseg's `(z, y, x)` ([`cwseg_models::monai`]), so both predict the same labels on the same
//! NIfTI file.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cwseg_models::monai::{MonaiNetwork, from_monai, from_monai_args, to_monai, to_monai_args};
use cwseg_models::{ModelConfig, weights};

use crate::card::ModelCard;
use crate::config::ContourMaps;
use crate::prepare::Preprocessing;
use crate::window::{Blend, WindowWeights};

/// What `cwseg import monai` reads and writes.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The MONAI class.
    pub network: MonaiNetwork,
    /// JSON of the constructor's keyword arguments.
    pub args: PathBuf,
    /// `safetensors.torch.save_file(net.state_dict(), path)`.
    pub weights: PathBuf,
    /// The model folder to write (must not exist).
    pub out: PathBuf,
    /// Sliding window `[z, y, x]` (UNETR: its `img_size`, reversed, by default).
    pub patch: Option<[usize; 3]>,
    /// Window overlap in `[0, 1)`.
    pub overlap: f64,
    /// Window weights (MONAI's `mode`).
    pub mode: WindowWeights,
    /// What MONAI's transforms did before the network: orientation and intensity window
    /// (nothing by default: give the model what the transforms gave the network).
    pub preprocessing: Preprocessing,
}

fn refuse_existing(out: &Path) -> Result<()> {
    if out.exists() {
        bail!(
            "{} already exists; choose another --out or remove it",
            out.display()
        );
    }
    Ok(())
}

/// The sliding window: `--patch`, or UNETR's `img_size`; UNETR takes only that size.
fn import_window(config: &ModelConfig, patch: Option<[usize; 3]>) -> Result<[usize; 3]> {
    let window = match (config, patch) {
        (_, Some(p)) => p,
        (ModelConfig::Unetr(c), None) => c.img_size,
        _ => bail!(
            "--patch Z,Y,X is required for V-Net: the sliding window (MONAI's roi_size, reversed)"
        ),
    };
    let multiples = config.size_multiples();
    if (0..3).any(|a| window[a] == 0 || !window[a].is_multiple_of(multiples[a])) {
        if multiples.iter().all(|&m| m == multiples[0]) {
            bail!(
                "--patch {window:?}: every side must be a positive multiple of {}",
                multiples[0]
            );
        }
        bail!(
            "--patch {window:?}: each side must be a positive multiple of {multiples:?} (z, y, x)"
        );
    }
    Ok(window)
}

/// `cwseg import monai`: the model folder (weights in cwseg's axis order, `config.json`,
/// `README.md`); returns notes for the user (arguments that act only in training).
pub fn import_monai(options: &ImportOptions) -> Result<Vec<String>> {
    refuse_existing(&options.out)?;
    crate::window::check_overlap(options.overlap, "--overlap")?;
    options
        .preprocessing
        .normalization
        .validate()
        .context("--window")?;
    let class = MonaiNetwork::class_name(options.network);
    let text = fs::read_to_string(&options.args)
        .with_context(|| format!("reading {}", options.args.display()))?;
    // a byte-order mark, as some Windows editors write, is not part of the JSON
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let args: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("{}: not JSON", options.args.display()))?;
    let import = from_monai_args(options.network, &args)
        .with_context(|| options.args.display().to_string())?;
    let patch = import_window(&import.config, options.patch)?;
    let tensors =
        candle_core::safetensors::load(&options.weights, &Device::Cpu).with_context(|| {
            format!(
                "{}: not a readable safetensors file",
                options.weights.display()
            )
        })?;
    let tensors =
        from_monai(&import, tensors).with_context(|| options.weights.display().to_string())?;
    let vars = VarMap::new();
    let network = import
        .config
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .with_context(|| options.args.display().to_string())?;
    network.check_size(patch)?;
    crate::memory::check_window(&network, patch, "--patch")?;
    weights::assign_strict(&vars, &tensors, &options.weights)?;
    let card = imported_card(&import.config, class, patch, options)?;
    crate::checkpoint::write_new_folder(&options.out, |tmp| {
        let metadata: HashMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            ("model".to_string(), card.model.name().to_string()),
            ("origin".to_string(), format!("monai.networks.nets.{class}")),
        ]
        .into_iter()
        .collect();
        let weights_path = tmp.join("model.safetensors");
        weights::save(&vars, &weights_path, DType::F32, &metadata)?;
        let card = card.with_weights_digest(&weights_path)?;
        fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&card)?,
        )
        .context("writing config.json")?;
        fs::write(tmp.join("README.md"), imported_readme(&card, options)?)
            .context("writing README.md")
    })?;
    Ok(import.notes)
}

/// The card of an imported network: classes and channels numbered, no preprocessing (MONAI's
/// transforms are the user's), the window and overlap given.
fn imported_card(
    model: &ModelConfig,
    class: &str,
    patch: [usize; 3],
    options: &ImportOptions,
) -> Result<ModelCard> {
    let classes = model.classes();
    let label_values = (0..classes)
        .map(|k| u8::try_from(k).context("more than 256 classes do not fit uint8 labels"))
        .collect::<Result<Vec<u8>>>()?;
    Ok(ModelCard {
        cwseg_version: env!("CARGO_PKG_VERSION").to_string(),
        model: model.clone(),
        loss: None,
        classes: (0..classes)
            .map(|k| {
                if k == 0 {
                    "background".into()
                } else {
                    format!("class_{k}")
                }
            })
            .collect(),
        label_values,
        modalities: (0..model.in_channels())
            .map(|c| format!("channel_{c}"))
            .collect(),
        preprocessing: options.preprocessing,
        patch,
        overlap: options.overlap,
        blend: Blend::Logits,
        window_weights: options.mode,
        contour_maps: ContourMaps::Volume,
        postprocessing: None,
        weights_sha256: None,
        precision: Default::default(),
        regions: None,
        origin: Some(format!(
            "monai.networks.nets.{class}, imported by `cwseg import monai`: {}",
            conversion(model)
        )),
    })
}

/// How the import turned MONAI's tensors into cwseg's.
fn conversion(model: &ModelConfig) -> &'static str {
    match model {
        ModelConfig::Unetr(_) => {
            "kernels' spatial axes reversed from MONAI's (x, y, z) to (z, y, x), position \
             embeddings reordered, img_size reversed"
        }
        ModelConfig::Swinunetr(_) => {
            "tensors unchanged; the network turns its (z, y, x) input into MONAI's (x, y, z) \
             order and its output back"
        }
        _ => "kernels' spatial axes reversed from MONAI's (x, y, z) to (z, y, x)",
    }
}

fn imported_readme(card: &ModelCard, options: &ImportOptions) -> Result<String> {
    Ok(format!(
        "# {} imported from MONAI\n\n{}.\n\nFrom `{}` (constructor arguments) and `{}` (state \
         dict). `cwseg predict --model THIS_FOLDER --input CASE.nii.gz --output OUT.nii.gz` gives \
         the labels of MONAI's `sliding_window_inference` (roi_size {:?} in MONAI's order, \
         overlap {}, mode \"{}\", softmax after blending, argmax) on the nibabel array of the \
         same file. \
         No intensity preprocessing is applied: give the network what MONAI's transforms gave \
         it.\n\n- network: `{}`\n",
        card.model.name(),
        card.origin.as_deref().unwrap_or_default(),
        options.args.display(),
        options.weights.display(),
        [card.patch[2], card.patch[1], card.patch[0]],
        card.overlap,
        match card.window_weights {
            WindowWeights::Gaussian => "gaussian",
            WindowWeights::Constant => "constant",
        },
        serde_json::to_string(&card.model)?,
    ))
}

/// `cwseg export RUN --format monai`: `model.safetensors` (a state dict MONAI's class loads
/// with `strict=True`), `args.json` (its keyword arguments) and a README, in `out`.
pub fn export_monai(run: &Path, out: &Path) -> Result<()> {
    refuse_existing(out)?;
    let dir = if run.join("best").join("model.safetensors").exists() {
        run.join("best")
    } else {
        run.to_path_buf()
    };
    let card = ModelCard::read(&dir)?;
    let (network, args) = to_monai_args(&card.model)?;
    card.verify_weights(&dir)?;
    let vars = VarMap::new();
    card.model
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
    weights::load_strict(&vars, dir.join("model.safetensors"))?;
    let state = to_monai(&card.model, weights::tensors(&vars)?)?;
    let class = MonaiNetwork::class_name(network);
    crate::checkpoint::write_new_folder(out, |tmp| {
        let metadata: HashMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            ("monai_class".to_string(), class.to_string()),
        ]
        .into_iter()
        .collect();
        weights::save_tensors(state, &tmp.join("model.safetensors"), &metadata)?;
        fs::write(tmp.join("args.json"), serde_json::to_string_pretty(&args)?)
            .context("writing args.json")?;
        fs::write(
            tmp.join("README.md"),
            format!(
                "# {class} for MONAI, exported by cwseg {}\n\n```python\nimport json\nfrom \
                 monai.networks.nets import {class}\nfrom safetensors.torch import load_file\n\n\
                 net = {class}(**json.load(open(\"args.json\")))\nnet.load_state_dict(load_file(\
                 \"model.safetensors\"))\n```\n\nThe weights are in MONAI's (x, y, z) axis order: \
                 feed the nibabel array of the file (`LoadImage`, channel first). Classes: {}. \
                 cwseg's preprocessing, to replay before the network: {}.\n",
                env!("CARGO_PKG_VERSION"),
                card.classes.join(", "),
                serde_json::to_string(&card.preprocessing)?,
            ),
        )
        .context("writing README.md")
    })
}
