//! `cwseg demo`: the compact phantom data set, a 3-D U-Net (the paper's, 3 levels) trained with
//! CEDL and with CWCD under the same seeds, evaluated on held-out phantoms, the paper-style
//! tables and a figure.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cwseg_data::{Anatomy, AugmentConfig, PhantomConfig};
use cwseg_losses::LossConfig;
use cwseg_metrics::{
    Aggregate, CaseMetrics, ClassSet, Summary, TableMetric, evaluate_case, markdown_table,
    summarize,
};
use cwseg_models::{ModelConfig, UNetConfig};
use cwseg_morphology::{ContourSpec, ErosionSpec, contour_map};
use ndarray::{Array3, Axis};
use serde_json::json;

use crate::compare::{PairedLine, PairedMetric, SeedRuns, compare};
use crate::figures::{LegendEntry, Panel, label_colour, write_titled_panels};
use crate::optim::Schedule;
use crate::predict::predict_probabilities;
use crate::prepare::{DataConfig, SyntheticConfig, open_data};
use crate::{RunOptions, TrainConfig, TrainHooks, load_model, parse_device, train};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The short version (one seed, fewer steps).
    pub quick: bool,
    /// Output folder.
    pub out: PathBuf,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// Seeds (default 3, or 1 with `quick`).
    pub seeds: Option<usize>,
    /// Convolution precision of training and evaluation.
    pub precision: cwseg_models::Precision,
}

/// The demo phantom: the compact anatomy (7 classes, each its own intensity) at 24 × 32 × 32
/// voxels of 6 × 4 × 4 mm, the field of view of the default 96 × 128 × 128 phantom at a quarter
/// of the voxels per axis, so that a 3-D U-Net learns every class in about a minute per run on
/// two CPU cores. Each training patch is the whole volume.
pub const DEMO_PHANTOM: PhantomConfig = PhantomConfig {
    anatomy: Anatomy::Compact,
    shape: [24, 32, 32],
    spacing: [6.0, 4.0, 4.0],
    ..PhantomConfig::ABDOMEN
};

/// Width in millimetres of the paper's contour band: 6 erosions of CT slices of about 0.75 mm
/// pixels.
pub const PAPER_BAND_MM: f64 = 4.5;

/// Erosions of the demo's contour band: [`PAPER_BAND_MM`] over the phantom's in-plane spacing,
/// rounded, at least 1 (the paper's 6 on the phantom would make nearly every voxel contour).
pub fn demo_contour_iterations() -> usize {
    let in_plane = DEMO_PHANTOM.spacing[1].min(DEMO_PHANTOM.spacing[2]);
    ((PAPER_BAND_MM / in_plane).round() as usize).max(1)
}

/// The run configuration of one demo training: the U-Net at 16 filters and 3 levels, Adam at
/// 0.01 with cosine decay, no flips (they would swap the phantom's left and right).
pub fn demo_config(quick: bool, loss: &str, seed: u64, device: &str) -> Result<TrainConfig> {
    let loss = match loss {
        "cwcd" => LossConfig::from_json(&format!(
            r#"{{"name": "cwcd", "contour": {{"iterations": {}}}}}"#,
            demo_contour_iterations()
        ))?,
        other => LossConfig::from_name(other)?,
    };
    Ok(TrainConfig {
        data: DataConfig {
            source: "synthetic".into(),
            synthetic: SyntheticConfig {
                train: 6,
                test: 3,
                phantom: DEMO_PHANTOM,
                seed: 1000,
            },
            val_fraction: 0.17,
            ..DataConfig::default()
        },
        model: ModelConfig::Unet(UNetConfig {
            filters: 16,
            depth: 3,
            ..UNetConfig::default()
        }),
        loss,
        patch: DEMO_PHANTOM.shape,
        batch_size: 2,
        epochs: if quick { 5 } else { 14 },
        batches_per_epoch: 10,
        seed,
        device: device.to_string(),
        optimizer: crate::optim::OptimizerConfig {
            lr: 0.01,
            ..Default::default()
        },
        schedule: Schedule::Cosine { min_lr: 1e-4 },
        augment: AugmentConfig {
            flip_probability: 0.0,
            ..AugmentConfig::default()
        },
        ..TrainConfig::default()
    })
}

/// Runs the demo (each training run watched by `hooks`); returns the Markdown table.
pub fn run(options: &DemoOptions, hooks: &mut dyn TrainHooks) -> Result<String> {
    let device = parse_device(&options.device)?;
    let effective = cwseg_models::set_precision(options.precision, &device);
    if effective != options.precision {
        tracing::warn!(
            "precision {} needs {}; running in {effective}",
            options.precision,
            options.precision.requirement()
        );
    }
    let seeds = options.seeds.unwrap_or(if options.quick { 1 } else { 3 });
    if seeds == 0 {
        bail!("--seeds 0: the demo needs at least one seed");
    }
    fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let data_dir = options.out.join("data");
    let losses = ["cedl", "cwcd"];
    let mut evaluations: Vec<Vec<CaseMetrics>> = vec![Vec::new(); losses.len()];
    let mut per_seed: Vec<Vec<f64>> = vec![Vec::new(); losses.len()];
    let mut predictions: Vec<Option<Array3<u8>>> = vec![None; losses.len()];
    let mut figure_case = None;
    let mut seconds = 0.0;
    let mut by_seed: Vec<SeedRuns> = vec![SeedRuns::new(); losses.len()];
    for seed in 0..seeds as u64 {
        for (i, loss) in losses.iter().enumerate() {
            let config = TrainConfig {
                precision: options.precision,
                ..demo_config(options.quick, loss, seed, &options.device)?
            };
            let dir = options.out.join(format!("{loss}-seed{seed}"));
            let resume = dir.join("last").join("state.json").exists();
            tracing::info!(
                "training U-Net with {} (seed {seed}) into {}",
                loss.to_uppercase(),
                dir.display()
            );
            let outcome = train(
                &config,
                &dir,
                &RunOptions {
                    resume,
                    data_dir: Some(data_dir.clone()),
                    communicator: None,
                },
                hooks,
            )?;
            seconds += outcome.seconds;
            if outcome.interrupted {
                return Err(crate::Interrupted(
                    "interrupted; run the same command again to continue".into(),
                )
                .into());
            }
            // held-out evaluation with the best-validation checkpoint
            let data = open_data(&config.data, config.seed, &data_dir)?;
            let test = data.load(&data.split.test)?;
            let (network, card, _) = load_model(&dir, &device)?;
            let classes: Vec<ClassSet> = (1..card.classes.len())
                .map(|k| ClassSet::region(&card.classes[k], &[k as i64]))
                .collect();
            let mut cases = Vec::new();
            for (c, case) in test.iter().enumerate() {
                let probs = predict_probabilities(
                    &network,
                    &case.image.data,
                    card.outputs(),
                    card.patch,
                    card.sliding_window(card.overlap),
                    2,
                    &device,
                )?;
                let mut prediction =
                    crate::regions::decide(probs.view(), card.region_classes()?.as_ref());
                if let Some(post) = &card.postprocessing {
                    post.apply(&mut prediction);
                }
                let spacing = case.image.geometry.spacing();
                cases.push(evaluate_case(
                    &format!("{}-seed{seed}", case.id),
                    prediction.view(),
                    case.label.data.view(),
                    &spacing,
                    &classes,
                )?);
                if seed == 0 && c == 0 {
                    predictions[i] = Some(prediction);
                    figure_case.get_or_insert_with(|| {
                        (
                            case.image.data.index_axis(Axis(0), 0).to_owned(),
                            case.label.data.clone(),
                        )
                    });
                }
            }
            per_seed[i].push(
                summarize(&cases, Aggregate::Paper)
                    .average
                    .dice
                    .unwrap_or(f64::NAN),
            );
            by_seed[i].insert(seed, cases.clone());
            evaluations[i].extend(cases);
        }
    }
    let summaries: Vec<Summary> = evaluations
        .iter()
        .map(|e| summarize(e, Aggregate::Paper))
        .collect();
    let names: Vec<String> = losses.iter().map(|l| l.to_uppercase()).collect();
    let runs: Vec<(&str, &Summary)> = names
        .iter()
        .map(String::as_str)
        .zip(summaries.iter())
        .collect();
    let table = markdown_table(&runs, TableMetric::Dice)?;
    let mut report = format!(
        "U-Net on the synthetic phantom: mean DSC per class over {} held-out phantoms × {seeds} seed(s), \
         paper aggregation (DSC = 0 cases are failures, excluded from the mean and counted).\n\n{table}\n",
        evaluations[0].len() / seeds
    );
    // the boundary metrics the paper's claim is about
    report.push_str(&format!(
        "\nHD95 (mm), failures excluded:\n\n{}\nNSD at 1 mm:\n\n{}\n",
        markdown_table(&runs, TableMetric::Hausdorff95)?,
        markdown_table(&runs, TableMetric::Nsd)?
    ));
    let class_names: Vec<String> = evaluations[0]
        .first()
        .map(|c| c.classes.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let every_case: BTreeMap<String, usize> =
        evaluations[0].iter().map(|c| (c.case.clone(), 0)).collect();
    let lines: Vec<PairedLine> = compare(&by_seed[0], &by_seed[1], &class_names, &every_case);
    report.push_str(&paired_table(&lines));
    for (name, values) in names.iter().zip(&per_seed) {
        report.push_str(&format!(
            "\n{name} average DSC per seed: {}",
            values
                .iter()
                .map(|v| format!("{v:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    report.push_str(&format!("\n\ntraining time: {seconds:.0} s in all\n"));
    cwseg_data::dataset::write_atomic(&options.out.join("results.md"), report.as_bytes())?;
    let paired: Vec<_> = lines
        .iter()
        .map(|l| {
            json!({
                "metric": format!("{:?}", l.metric),
                "class": l.region,
                "pairs": l.stats.map(|s| s.n),
                "mean_difference": l.stats.map(|s| s.mean),
                "ci95": l.stats.map(|s| [s.ci_low, s.ci_high]),
                "cwcd_better": l.stats.map(|s| if l.metric == PairedMetric::Hd95 { s.negative } else { s.positive }),
                "cedl_better": l.stats.map(|s| if l.metric == PairedMetric::Hd95 { s.positive } else { s.negative }),
            })
        })
        .collect();
    let json = json!({
        "seeds": seeds,
        "losses": names,
        "summaries": summaries,
        "average_dice_per_seed": per_seed,
        "paired_cwcd_minus_cedl": paired,
    });
    cwseg_data::dataset::write_atomic(
        &options.out.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    if let (Some((image, label)), Some(cedl), Some(cwcd)) =
        (figure_case, &predictions[0], &predictions[1])
    {
        let classes: Vec<String> = DEMO_PHANTOM
            .anatomy
            .classes()
            .iter()
            .map(|c| c.to_string())
            .collect();
        write_figure(
            &options.out.join("demo.png"),
            &image,
            &label,
            cedl,
            cwcd,
            &classes,
        )?;
    }
    Ok(report)
}

/// The paired CWCD − CEDL differences per class over seeds × held-out phantoms (each phantom
/// and seed one pair), as a Markdown table with the sign agreement.
fn paired_table(lines: &[PairedLine]) -> String {
    let mut md = String::from(
        "\nCWCD − CEDL per class, paired over seeds × held-out phantoms (DSC under the paper's rule: \
         pairs with a failure on either side left out; HD95 lower is better). `CWCD better`: pairs \
         where CWCD is ahead.\n\n| class | metric | pairs | mean Δ | 95 % CI | CWCD better | CEDL better |\n|---|---|---|---|---|---|---|\n",
    );
    for line in lines
        .iter()
        .filter(|l| l.scope == "pooled" && l.metric != PairedMetric::DiceMonai)
    {
        let Some(s) = line.stats else {
            md.push_str(&format!(
                "| {} | {} | 0 | - | - | - | - |\n",
                line.region,
                line.metric.label()
            ));
            continue;
        };
        let (better, worse) = if line.metric == PairedMetric::Hd95 {
            (s.negative, s.positive)
        } else {
            (s.positive, s.negative)
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:+.4} | [{:+.4}, {:+.4}] | {better} | {worse} |\n",
            line.region,
            line.metric.label(),
            s.n,
            s.mean,
            s.ci_low,
            s.ci_high
        ));
    }
    md
}

/// Colours of the error map: both predictions wrong, only CEDL wrong, only CWCD wrong.
const ERROR_COLOURS: [[u8; 3]; 3] = [[255, 255, 255], [255, 140, 0], [0, 200, 255]];

/// The axial slice where the two predictions differ in the most voxels (ties: the most
/// ground-truth classes, then the lowest index).
fn figure_slice(label: &Array3<u8>, cedl: &Array3<u8>, cwcd: &Array3<u8>) -> usize {
    let score = |z: usize| {
        let differ = ndarray::Zip::from(cedl.index_axis(Axis(0), z))
            .and(cwcd.index_axis(Axis(0), z))
            .fold(0usize, |n, a, b| n + usize::from(a != b));
        let mut seen = [false; 256];
        label
            .index_axis(Axis(0), z)
            .iter()
            .for_each(|&l| seen[l as usize] = true);
        (differ, seen.iter().filter(|&&s| s).count())
    };
    (0..label.dim().0)
        .rev()
        .max_by_key(|&z| score(z))
        .unwrap_or(0)
}

/// The error map: 1 where both predictions miss the truth, 2 where only CEDL does, 3 where
/// only CWCD does, 0 where both are right.
fn error_map(label: &Array3<u8>, cedl: &Array3<u8>, cwcd: &Array3<u8>) -> Array3<u8> {
    let mut out = Array3::<u8>::zeros(label.dim());
    ndarray::Zip::from(&mut out)
        .and(label)
        .and(cedl)
        .and(cwcd)
        .for_each(|e, &t, &a, &b| {
            *e = match (a != t, b != t) {
                (true, true) => 1,
                (true, false) => 2,
                (false, true) => 3,
                (false, false) => 0,
            }
        });
    out
}

/// `demo.png`: one axial slice (where the losses differ most) of the first held-out phantom
/// under seed 0: titled panels (image, ground truth, CEDL, CWCD, the contour map CWCE weighted
/// in training, the errors of each) and legends for the classes and the error colours.
fn write_figure(
    path: &Path,
    image: &Array3<f32>,
    label: &Array3<u8>,
    cedl: &Array3<u8>,
    cwcd: &Array3<u8>,
    classes: &[String],
) -> Result<()> {
    let z = figure_slice(label, cedl, cwcd);
    // the band CWCE weighted in training, of the whole ground-truth volume
    let spec = ContourSpec {
        erosion: ErosionSpec {
            iterations: demo_contour_iterations(),
            ..ErosionSpec::paper()
        },
        include_background: true,
    };
    let contours = contour_map(label.view(), &spec)?
        .into_union()
        .mapv(u8::from);
    let errors = error_map(label, cedl, cwcd);
    let img = image.index_axis(Axis(0), z);
    let panels = [
        ("image", Panel::Gray(img)),
        (
            "ground truth",
            Panel::Labels(img, label.index_axis(Axis(0), z)),
        ),
        ("CEDL", Panel::Labels(img, cedl.index_axis(Axis(0), z))),
        ("CWCD", Panel::Labels(img, cwcd.index_axis(Axis(0), z))),
        (
            "contour map",
            Panel::Mask(img, contours.index_axis(Axis(0), z)),
        ),
        (
            "errors",
            Panel::Categories(img, errors.index_axis(Axis(0), z), &ERROR_COLOURS),
        ),
    ];
    let heading = format!("held-out phantom, axial slice z = {z}");
    let mut legend: Vec<Vec<LegendEntry>> = Vec::new();
    for (k, name) in classes.iter().enumerate().skip(1) {
        if (k - 1) % 4 == 0 {
            legend.push(Vec::new());
        }
        if let Some(line) = legend.last_mut() {
            line.push(LegendEntry {
                colour: label_colour(k as u8),
                name: name.clone(),
            });
        }
    }
    legend.push(
        ["both wrong", "CEDL wrong", "CWCD wrong"]
            .iter()
            .zip(ERROR_COLOURS)
            .map(|(name, colour)| LegendEntry {
                colour,
                name: name.to_string(),
            })
            .collect(),
    );
    legend.push(vec![LegendEntry {
        colour: [255, 255, 0],
        name: format!("contour band ({} erosion(s))", spec.erosion.iterations),
    }]);
    write_titled_panels(path, &heading, &panels, &legend, 3, 6)
}
