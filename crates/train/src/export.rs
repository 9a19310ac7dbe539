//! A run (or model folder) as a Hugging Face model folder: the weights (strictly checked, cast to
//! the chosen dtype), `config.json` and a `README.md` model card stating what the model is, how
//! it was trained and evaluated (see [`crate::hub`] for fetching such folders).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use cwseg_models::{describe, weights};

use crate::card::ModelCard;

/// What `export` writes besides the weights.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Weight precision: f32, f16 or bf16.
    pub dtype: DType,
    /// SPDX licence of the weights for the card's front matter.
    pub license: Option<String>,
    /// An `cwseg evaluate --json` report to put in the card.
    pub evaluation: Option<PathBuf>,
    /// A `cwseg experiment` table (CSV) whose rows for this network and loss go in the card.
    pub cross_validation: Option<PathBuf>,
}

/// Refuses an ensemble folder (`ensemble.json`, or a `cwseg cv` folder) as the model to export,
/// naming its members: an export holds one network's weights.
pub fn refuse_ensemble(path: &Path) -> Result<()> {
    let Some(file) = crate::ensemble::ensemble_file(path) else {
        return Ok(());
    };
    let members = crate::ensemble::EnsembleFile::read(&file)?.members;
    bail!(
        "{}: an ensemble ({}) of {} models, {}; export holds one model's weights: export a \
         member",
        path.display(),
        file.display(),
        members.len(),
        members.join(", ")
    )
}

/// Writes the Hugging Face model folder of a run (its best checkpoint) to `out`: the weights
/// (strictly checked against the config, cast to `dtype`, with metadata), `config.json` and
/// a `README.md` model card. The folder is written beside `out` and renamed into place; an
/// existing `out` is refused.
pub fn export(run: &Path, out: &Path, options: &ExportOptions) -> Result<()> {
    if out.exists() {
        bail!(
            "{} already exists; choose another --out or remove it",
            out.display()
        );
    }
    let (model_dir, run_dir) = if run.join("best").join("model.safetensors").exists() {
        (run.join("best"), Some(run.to_path_buf()))
    } else if run.join("model.safetensors").exists() {
        let parent = run
            .parent()
            .filter(|p| p.join("train.toml").exists())
            .map(Path::to_path_buf);
        (run.to_path_buf(), parent)
    } else {
        refuse_ensemble(run)?;
        bail!(
            "{}: no model.safetensors (expected a run folder with best/ or a model folder)",
            run.display()
        );
    };
    let card = ModelCard::read(&model_dir)?;
    card.verify_weights(&model_dir)?;
    let vars = VarMap::new();
    let network = card.model.build(candle_nn::VarBuilder::from_varmap(
        &vars,
        DType::F32,
        &Device::Cpu,
    ))?;
    drop(network);
    weights::load_strict(&vars, model_dir.join("model.safetensors"))?;

    let evaluation = options
        .evaluation
        .as_ref()
        .map(|p| -> Result<serde_json::Value> {
            let text = fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let report: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                format!("{}: not a `cwseg evaluate --json` report", p.display())
            })?;
            check_evaluation_report(&report, &card)
                .with_context(|| format!("--evaluation {}", p.display()))?;
            Ok(report)
        })
        .transpose()?;
    let cross_validation = options
        .cross_validation
        .as_ref()
        .map(|p| cross_validation_section(p, &card))
        .transpose()?;
    let metadata: HashMap<String, String> = [
        ("format", "pt".to_string()),
        ("cwseg_version", card.cwseg_version.clone()),
        ("model", card.model.name().to_string()),
        ("loss", serde_json::to_string(&card.loss)?),
        ("dtype", format!("{:?}", options.dtype).to_lowercase()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    crate::checkpoint::write_new_folder(out, |tmp| {
        weights::save(
            &vars,
            tmp.join("model.safetensors"),
            options.dtype,
            &metadata,
        )?;
        let card = card.with_weights_digest(&tmp.join("model.safetensors"))?;
        fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&card)?,
        )
        .context("writing config.json")?;
        let mut readme = model_card(&card, run_dir.as_deref(), evaluation.as_ref(), options)?;
        readme.push_str(cross_validation.as_deref().unwrap_or_default());
        fs::write(tmp.join("README.md"), readme).context("writing README.md")
    })?;
    Ok(())
}

/// A licence id for the card's front matter (`cc-by-nc-4.0`, `apache-2.0`, `other`): letters,
/// digits, `.`, `+` and `-` only, so that it cannot break the YAML it is written into.
pub fn parse_license(text: &str) -> std::result::Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || ".+-".contains(c);
    if text.is_empty() || !text.chars().all(allowed) {
        return Err(format!(
            "`{}`: a licence id has only letters, digits, `.`, `+` and `-` (e.g. cc-by-nc-4.0, \
             apache-2.0, other)",
            text.escape_debug()
        ));
    }
    Ok(text.to_string())
}

/// How the card names a run's data: `synthetic`, or a local folder's own name (never its
/// absolute path, which says nothing to a reader and exposes the exporter's file system).
fn data_name(source: &str) -> String {
    match Path::new(source).file_name() {
        Some(name) if source != "synthetic" => {
            format!("a local folder named `{}`", name.to_string_lossy())
        }
        _ => format!("`{source}`"),
    }
}

/// Refuses a JSON file that is not one run's `cwseg evaluate --json` report of this model's
/// classes: an `aggregate` name and a `mean` table whose rows are the card's label values or
/// BraTS regions (a report of several runs, another layout or other classes would give an
/// empty or false section).
fn check_evaluation_report(report: &serde_json::Value, card: &ModelCard) -> Result<()> {
    if report.is_array() {
        bail!("a report of several runs; give the report of this model's predictions alone");
    }
    if report["aggregate"].as_str().is_none() {
        bail!("no `aggregate` field: not a `cwseg evaluate --json` report");
    }
    let Some(means) = report["mean"].as_object().filter(|m| !m.is_empty()) else {
        bail!("no `mean` table: not a `cwseg evaluate --json` report");
    };
    let known = |class: &str| {
        class
            .parse::<u8>()
            .is_ok_and(|v| card.label_values.contains(&v))
            || ["WT", "TC", "ET"].contains(&class)
    };
    if let Some(other) = means.keys().find(|class| !known(class)) {
        bail!(
            "its class `{other}` is none of the model's label values {:?} (nor a BraTS region): \
             a report of another model's predictions?",
            card.label_values
        );
    }
    Ok(())
}

/// The model card's "Cross-validation" section: the rows of a `cwseg experiment` table CSV
/// whose runs trained the card's network with the card's loss
/// ([`crate::experiment::table_rows`]), one line per metric with a column per region.
fn cross_validation_section(path: &Path, card: &ModelCard) -> Result<String> {
    let Some(loss) = &card.loss else {
        bail!(
            "--cross-validation: the model was not trained by cwseg, so no experiment table describes it"
        );
    };
    let rows = crate::experiment::table_rows(path, card.model.name(), loss)?;
    let mut regions: Vec<&str> = Vec::new();
    let mut metrics: Vec<&str> = Vec::new();
    for row in &rows {
        if !regions.contains(&row.region.as_str()) {
            regions.push(&row.region);
        }
        if !metrics.contains(&row.metric.as_str()) {
            metrics.push(&row.metric);
        }
    }
    let seeds = rows.iter().map(|r| r.seeds).max().unwrap_or(0);
    let name = path
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let mut s = format!(
        "\n## Cross-validation\n\nThe training protocol's test metrics from the experiment table `{name}` \
         (this network and loss; mean ± standard deviation over {seeds} seeds of the mean over \
         every fold's test cases; `failed`: case × seed pairs with DSC 0, left out of the paper \
         aggregation and HD95, counted as 0 by MONAI's). They estimate what this model's protocol achieves on unseen \
         cases.\n\n| metric | {} |\n|---|{}\n",
        regions.join(" | "),
        "---|".repeat(regions.len())
    );
    for metric in metrics {
        let cells: Vec<String> = regions
            .iter()
            .map(|&region| {
                rows.iter()
                    .find(|r| r.metric == metric && r.region == region)
                    .map_or("-".to_string(), |r| {
                        let digits = if metric.starts_with("hd95") { 2 } else { 4 };
                        // MONAI's aggregation counts a failure as DSC 0 rather than leaving it out
                        let failed = if r.failures == 0 || metric == "dsc_monai" {
                            String::new()
                        } else {
                            format!(" ({} failed)", r.failures)
                        };
                        format!("{:.digits$} ± {:.digits$}{failed}", r.mean, r.std)
                    })
            })
            .collect();
        let label = match metric {
            "dsc_paper" => "DSC (paper aggregation)",
            "dsc_monai" => "DSC (MONAI aggregation)",
            "hd95_mm" => "HD95 (mm)",
            other => other,
        };
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    Ok(s)
}

/// The best epoch's validation DSC per class from `metrics.jsonl`.
fn validation_at_best(run_dir: &Path) -> Option<(usize, Vec<Option<f64>>)> {
    let text = fs::read_to_string(run_dir.join("metrics.jsonl")).ok()?;
    let mut best: Option<(f64, usize, Vec<Option<f64>>)> = None;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let Some(d) = v["val_dice"].as_f64() else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _, _)| d > *b) {
            let per_class = v["val_dice_per_class"]
                .as_array()
                .map(|a| a.iter().map(serde_json::Value::as_f64).collect())
                .unwrap_or_default();
            best = Some((d, v["epoch"].as_u64().unwrap_or(0) as usize, per_class));
        }
    }
    best.map(|(_, e, p)| (e, p))
}

fn model_card(
    card: &ModelCard,
    run_dir: Option<&Path>,
    evaluation: Option<&serde_json::Value>,
    options: &ExportOptions,
) -> Result<String> {
    let info = describe(&card.model, card.patch)?;
    let loss = card.loss.as_ref().map(|l| l.build());
    let loss_name = loss.as_ref().map_or("imported", |l| l.name());
    let mut s = String::new();
    let _ = writeln!(s, "---");
    if let Some(license) = &options.license {
        let _ = writeln!(s, "license: {license}");
    }
    let _ = writeln!(s, "library_name: cwseg");
    let _ = writeln!(s, "pipeline_tag: image-segmentation");
    let _ = writeln!(s, "tags:");
    for tag in [
        "medical-imaging",
        "segmentation",
        "cwseg",
        "3d",
        card.model.name(),
        &loss_name.to_lowercase(),
    ] {
        let _ = writeln!(s, "- {tag}");
    }
    let _ = writeln!(s, "---\n");
    let _ = writeln!(
        s,
        "# {} + {} ({} classes)\n",
        card.model.name(),
        loss_name,
        card.classes.len()
    );
    match &card.origin {
        None => {
            let _ = writeln!(
                s,
                "A 3D segmentation network trained with cwseg {}.\n",
                card.cwseg_version
            );
        }
        Some(origin) => {
            let _ = writeln!(
                s,
                "A 3D segmentation network packaged by cwseg {}; the weights come from {origin}.\n",
                card.cwseg_version
            );
        }
    }
    if options.license.is_none() {
        let _ = writeln!(
            s,
            "Licence: none stated when this folder was exported (`cwseg export --license ID`); \
             ask whoever published it, and mind the licence of the training data.\n"
        );
    }
    let _ = writeln!(s, "## Use\n");
    let _ = writeln!(
        s,
        "```sh\ncwseg predict --model hf://ORG/NAME --input CASE_OR_FOLDER --output OUT\n```\n"
    );
    let _ = writeln!(
        s,
        "`cwseg` replays the preprocessing below, predicts by sliding window and writes labels with \
         the input's geometry and header. Offline (`HF_HUB_OFFLINE=1`) it reads the Hugging Face cache.\n"
    );
    let _ = writeln!(s, "## Model\n");
    let _ = writeln!(
        s,
        "- network: `{}`, {} parameters",
        serde_json::to_string(&card.model)?,
        info.parameters
    );
    match &card.loss {
        Some(loss) => {
            let _ = writeln!(s, "- loss: `{}`", serde_json::to_string(loss)?);
        }
        None => {
            let _ = writeln!(
                s,
                "- trained outside cwseg: {}",
                card.origin.as_deref().unwrap_or("unknown")
            );
        }
    }
    let _ = writeln!(s, "- input channels: {}", card.modalities.join(", "));
    let p = &card.preprocessing;
    let _ = writeln!(
        s,
        "- preprocessing: crop to non-zero voxels {}, spacing {}, normalisation `{}`",
        if p.crop_foreground { "yes" } else { "no" },
        p.spacing
            .map_or("unchanged".to_string(), |v| format!("{v:?} mm (z, y, x)")),
        serde_json::to_string(&p.normalization)?
    );
    let _ = writeln!(
        s,
        "- training contour maps: {}",
        match card.contour_maps {
            crate::ContourMaps::Volume => "the whole volume's map cropped with each patch",
            crate::ContourMaps::Patch => "each patch's own map (v1)",
        }
    );
    let _ = writeln!(
        s,
        "- post-processing: {}",
        match &card.postprocessing {
            None => "none".to_string(),
            Some(p) if p.keep_largest.is_empty() => format!(
                "none kept (decided on the validation cases: mean DSC {:.4})",
                p.validation_dice_before
            ),
            Some(p) => format!(
                "largest connected component of {} (validation mean DSC over {} {:.4} → {:.4})",
                p.keep_largest
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                p.scored.join("/"),
                p.validation_dice_before,
                p.validation_dice_after
            ),
        }
    );
    let _ = writeln!(
        s,
        "- inference window {:?} (z, y, x), overlap {}\n",
        card.patch, card.overlap
    );
    let _ = writeln!(s, "| class | name | stored label value |\n|---|---|---|");
    for (k, (name, value)) in card.classes.iter().zip(&card.label_values).enumerate() {
        let _ = writeln!(s, "| {k} | {name} | {value} |");
    }
    if let Some(dir) = run_dir {
        let _ = writeln!(s, "\n## Training\n");
        if let Ok(text) = fs::read_to_string(dir.join("train.toml"))
            && let Ok(config) = toml::from_str::<crate::TrainConfig>(&text)
        {
            let _ = writeln!(
                s,
                "- data: {}; {} epochs × {} batches of {} patches {:?}; optimizer `{}`, schedule `{}`; seed {}",
                data_name(&config.data.source),
                config.epochs,
                config.batches_per_epoch,
                config.batch_size,
                config.patch,
                serde_json::to_string(&config.optimizer)?,
                serde_json::to_string(&config.schedule)?,
                config.seed
            );
        }
        if let Ok(text) = fs::read_to_string(dir.join("split.json"))
            && let Ok(split) = serde_json::from_str::<serde_json::Value>(&text)
        {
            let n = |k: &str| split[k].as_array().map_or(0, Vec::len);
            let _ = writeln!(
                s,
                "- split: {} training, {} validation, {} test cases",
                n("train"),
                n("val"),
                n("test")
            );
        }
        if let Some((epoch, per_class)) = validation_at_best(dir) {
            let _ = writeln!(
                s,
                "\n### Validation DSC at the kept checkpoint (epoch {epoch})\n\n| class | DSC |\n|---|---|"
            );
            for (k, d) in per_class.iter().enumerate() {
                let name = card.classes.get(k + 1).map_or("?", String::as_str);
                let _ = writeln!(
                    s,
                    "| {name} | {} |",
                    d.map_or("-".into(), |d| format!("{d:.4}"))
                );
            }
        }
    }
    if let Some(report) = evaluation {
        let _ = writeln!(
            s,
            "\n## Evaluation ({} aggregation)\n\n| class | DSC | HD95 (mm) | failures |\n|---|---|---|---|",
            report["aggregate"].as_str().unwrap_or("?")
        );
        if let Some(means) = report["mean"].as_object() {
            let mut entries: Vec<(&String, &serde_json::Value)> = means.iter().collect();
            // label values in numeric order, names after them
            entries.sort_by_key(|(class, _)| (class.parse::<i64>().unwrap_or(i64::MAX), *class));
            for (class, m) in entries {
                let f = |k: &str, digits: usize| {
                    m[k].as_f64()
                        .map_or("-".to_string(), |v| format!("{v:.digits$}"))
                };
                // reports name classes by their stored label value
                let name = class
                    .parse::<u8>()
                    .ok()
                    .and_then(|v| card.label_values.iter().position(|&l| l == v))
                    .map_or(class.clone(), |k| format!("{} ({class})", card.classes[k]));
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} |",
                    f("dice", 4),
                    f("hd95", 2),
                    report["failures"][class].as_u64().unwrap_or(0)
                );
            }
            let average = &report["average"];
            let _ = writeln!(
                s,
                "| Avg | {} | {} | |",
                average["dice"]
                    .as_f64()
                    .map_or("-".to_string(), |v| format!("{v:.4}")),
                average["hd95"]
                    .as_f64()
                    .map_or("-".to_string(), |v| format!("{v:.2}"))
            );
        }
    }
    Ok(s)
}
